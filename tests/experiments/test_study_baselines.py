"""The three added baselines (CoS, LLM-TRSR, NextQuill) as rows of a tiny `flythinker study` beside SFT, with a
CoS λ sweep as variants: each trains (or not), writes predictions, is timed and scored."""

import json

import pytest

from flythinker.cli.main import main
from flythinker.testing import study_yaml


@pytest.mark.slow
def test_a_tiny_study_runs_sft_cos_trsr_and_nextquill_with_a_cos_lambda_sweep(tmp_path, tokenizer, capsys):
    from flythinker.experiments.synthetic import write_demo_dataset
    from flythinker.methods.nextquill import NextQuillModel
    from flythinker.methods.trsr import TRSRModel
    from flythinker.testing import tiny_lm

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, num_layers=2, max_positions=2048).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    write_demo_dataset(tmp_path / "data", seed=1, n_users_train=3, n_users_test=2, items_per_user=6)
    cache = tmp_path / "summaries.jsonl"
    cfg = tmp_path / "study.yaml"

    def write(methods: list[str], variants: list[dict]) -> None:
        study_yaml(cfg, tmp_path / "data", tmp_path / "out", gen_dir, methods=methods, variants=variants,
                   train_examples=3,
                   model={"generator": str(gen_dir), "reasoner": "none",
                          "trsr": {"summary_tokens": 24, "teacher": {"cache": str(cache)}}},
                   data={"k": 1, "profile_tokens": 48, "query_tokens": 32, "target_tokens": 16},
                   train={"batch_size": 2, "grad_accum": 1, "max_steps": 2, "progress": False, "lr_generator": 1e-3},
                   decode={"max_new_tokens": 5, "batch_size": 2})

    # the CoS λ sweep: two variants of the cos row
    write(["sft", "cos", "trsr", "nextquill"],
          [{"name": f"CoS-lam{lam:g}", "method": "cos", "overrides": {"model.cos.lam": lam}} for lam in (0.0, 3.0)])
    assert main(["study", "--config", str(cfg)]) == 0
    log = capsys.readouterr().out
    out = tmp_path / "out" / "user"
    rows = ["SFT", "CoS", "LLM-TRSR", "NextQuill", "CoS-lam0", "CoS-lam3"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["splits"]["user"]
    assert set(summary["metrics"]) == set(rows)
    eff = {r["method"]: r for r in summary["efficiency"]}
    for name in rows:
        preds = [json.loads(x) for x in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 2 and all(p["method"] == name for p in preds)
        assert eff[name]["decode_ms_per_token"] > 0
    for name in ("LLM-TRSR", "NextQuill"):
        assert f"[{name}] training on 3 examples" in log and eff[name]["train_s_per_step"] > 0
    assert eff["CoS"]["train_s_per_step"] is None and "[CoS] training" not in log
    assert isinstance(TRSRModel.from_pretrained(out / "LLM-TRSR" / "train" / "final"), TRSRModel)
    assert isinstance(NextQuillModel.from_pretrained(out / "NextQuill" / "train" / "final"), NextQuillModel)
    assert cache.is_file() and len(cache.read_text().splitlines()) >= 3         # training + eval summaries

    # λ = 0 is the untrained Generator with RAG's prompt: a RAG row in the same folder writes the same texts
    write(["rag"], [])
    assert main(["study", "--config", str(cfg)]) == 0
    rag = [json.loads(x)["prediction"] for x in (out / "RAG" / "predictions.jsonl").read_text().splitlines()]
    lam0 = [json.loads(x)["prediction"] for x in (out / "CoS-lam0" / "predictions.jsonl").read_text().splitlines()]
    assert rag == lam0


def test_each_baseline_is_a_runner_row(tmp_path, tokenizer):
    """The fast check of the same path (`runner.run_method`, what every study row runs): train if trained, write
    predictions with the method's own prompts."""
    from flythinker.data import DataConfig, Example
    from flythinker.decoding.sampling import DecodeConfig
    from flythinker.experiments.runner import MethodSpec, run_method
    from flythinker.methods import ModelArgs
    from flythinker.testing import tiny_lm
    from flythinker.training.config import TrainArgs

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, max_positions=1024).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    examples = [Example(id=f"e{i}", user_id=f"u{i}", input=f"Write the review of album {i}", output="Warm and honest.",
                        profile=[{"text": f"I loved album {j}. The melodies are warm."} for j in range(2)],
                        task="generic") for i in range(4)]
    margs = ModelArgs(method="sft", generator=str(gen_dir), reasoner="none")
    margs.trsr.teacher.cache = str(tmp_path / "summaries.jsonl")
    data = DataConfig(k=1, profile_tokens=48, min_item_tokens=16, query_tokens=24, target_tokens=8, system_prompt="")
    train = TrainArgs(batch_size=2, grad_accum=1, max_steps=1, progress=False)
    for name, method in (("CoS", "cos"), ("LLM-TRSR", "trsr"), ("NextQuill", "nextquill")):
        res = run_method(MethodSpec(name, method), examples[:2], examples[2:], margs, data, train,
                         DecodeConfig(max_new_tokens=3, batch_size=2), tmp_path / "out", progress=False,
                         log=lambda *a: None)
        lines = [json.loads(x) for x in res.predictions.read_text().splitlines()]
        assert [r["id"] for r in lines] == ["e2", "e3"] and all(r["method"] == name for r in lines)
        assert res.train_steps == (0 if method == "cos" else 1)
