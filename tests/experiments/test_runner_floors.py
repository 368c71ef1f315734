"""The runner with model-free rows (the copy floors): predictions through the fingerprinted writer without any
model, a resume that reuses them, no decode timing and no cost figures (the fast half of tests/methods/test_copy.py's
study test, which also scores them)."""

import json

from flythinker.data import DataConfig, load_examples
from flythinker.decoding.sampling import DecodeConfig
from flythinker.methods import ModelArgs
from flythinker.training.config import TrainArgs


def test_floors_write_predictions_without_a_model_and_have_no_cost(tmp_path, tokenizer, monkeypatch):
    from flythinker.experiments.runner import MethodSpec, efficiency_table, remeasure_decode, run_method
    from flythinker.experiments.synthetic import write_demo_dataset
    from flythinker.methods.copy import _Copy
    from flythinker.testing import tiny_lm

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, num_layers=1, max_positions=512).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    files = write_demo_dataset(tmp_path / "data", seed=1, n_users_train=1, n_users_test=2, items_per_user=6)
    dev = load_examples(tmp_path / "data" / "user" / "dev.jsonl")[:3]
    assert files and len(dev) == 3
    built = []
    monkeypatch.setattr(_Copy, "build", lambda self, args: built.append(self.name))  # must never be called
    margs = ModelArgs(method="sft", generator=str(gen_dir))
    data = DataConfig(k=1, profile_tokens=32, query_tokens=16, target_tokens=8)
    decode = DecodeConfig(max_new_tokens=2, batch_size=2)
    specs = [MethodSpec("RAG", "rag"), MethodSpec("Copy-latest", "copy_latest"),
             MethodSpec("Copy-retrieved", "copy_retrieved")]
    logs = []
    results = [run_method(s, [], dev, margs, data, TrainArgs(), decode, tmp_path / "out", progress=False,
                          log=logs.append) for s in specs]
    assert built == []
    for spec, res in zip(specs[1:], results[1:]):
        lines = [json.loads(x) for x in res.predictions.read_text().splitlines()]
        assert [r["id"] for r in lines] == [e.id for e in dev] and all(r["method"] == spec.name for r in lines)
        assert all(set(r["run"]) == {"checkpoint", "data", "decode"} for r in lines)
        assert not (res.predictions.parent / "train").exists() and not (res.predictions.parent / "timing.json").exists()
    latest = [json.loads(x)["prediction"] for x in results[1].predictions.read_text().splitlines()]
    assert latest == [e.profile[0]["text"] for e in dev]
    # a re-run reuses the floors' files; a changed data setting that reaches them is refused, not mixed in
    logs.clear()
    run_method(specs[1], [], dev, margs, data, TrainArgs(), decode, tmp_path / "out", progress=False, log=logs.append)
    assert "0 predictions written (3 reused)" in logs[-1]

    remeasure_decode(results, specs, margs, data, dev[0], tmp_path / "out", tokenizer, new_tokens=2, runs=1,
                     log=logs.append)
    assert set(json.loads((tmp_path / "out" / "decode_timing.json").read_text())["ms_per_token"]) == {"RAG"}
    assert results[0].decode_ms_per_token > 0
    assert [r.decode_ms_per_token for r in results[1:]] == [None, None]
    eff = {r["method"]: r for r in efficiency_table(results, baseline="RAG")}
    for name in ("Copy-latest", "Copy-retrieved"):
        assert eff[name]["train_s_per_step"] is None and eff[name]["decode_ms_per_token"] is None
        assert eff[name]["decode_ratio_to_sft"] is None and eff[name]["train_ratio_to_sft"] is None
    assert eff["RAG"]["decode_ratio_to_sft"] == 1.0
