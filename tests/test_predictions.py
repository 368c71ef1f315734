"""Resumable generation: the model-independent core with a deterministic fake, kills (exception, SIGKILL, torn last
line), and one integration run of `flythinker generate` on a tiny saved checkpoint."""

import json

import pytest

from flythinker.inference import decode_new_tokens
from flythinker.predictions import generate_predictions, scan_predictions
from flythinker.utils import UserError

EXAMPLES = [{"id": f"ex{i:03d}", "user_id": f"u{i % 4}", "input": f"Write text number {i}.",
             "output": f"Réference {i} — ünïcode"} for i in range(23)]


def fake_predict(batch):
    return [f"prediction for {ex['id']}: {ex['input'][::-1]}" for ex in batch]


class Boom(RuntimeError):
    pass


def failing_after(k):
    seen = {"n": 0}

    def fn(batch):
        if seen["n"] + len(batch) > k:
            raise Boom("killed")
        seen["n"] += len(batch)
        return fake_predict(batch)

    return fn


@pytest.fixture
def one_shot(tmp_path):
    path = tmp_path / "one_shot.jsonl"
    generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    return path.read_bytes()


def test_one_shot_file_format(tmp_path, one_shot):
    lines = one_shot.decode().splitlines()
    assert len(lines) == len(EXAMPLES)
    rec = json.loads(lines[5])
    assert list(rec) == ["id", "user_id", "method", "prediction", "reference", "input"]
    assert rec["id"] == "ex005" and rec["user_id"] == "u1" and rec["method"] == "fake"
    assert rec["reference"] == "Réference 5 — ünïcode"  # written as UTF-8, not escaped
    assert "ü" in one_shot.decode()


def test_resume_after_exception_is_identical(tmp_path, one_shot):
    path = tmp_path / "p.jsonl"
    with pytest.raises(Boom):
        generate_predictions(EXAMPLES, failing_after(10), path, batch_size=4, method="fake", progress=False)
    assert len(path.read_bytes().splitlines()) == 8  # two whole batches survived
    calls = []
    stats = generate_predictions(EXAMPLES, lambda b: calls.append(len(b)) or fake_predict(b), path, batch_size=4,
                                 method="fake", progress=False)
    assert stats.skipped == 8 and stats.written == 15 and not stats.repaired
    assert path.read_bytes() == one_shot
    again = generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    assert again.written == 0 and path.read_bytes() == one_shot


def test_torn_last_line_is_dropped_and_rewritten(tmp_path, one_shot):
    path = tmp_path / "p.jsonl"
    lines = one_shot.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:6]) + lines[6][:17])  # a kill in the middle of writing line 7
    assert scan_predictions(path, repair=False)[1] is True
    stats = generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    assert stats.repaired and stats.skipped == 6 and stats.written == 17
    assert path.read_bytes() == one_shot


def test_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    generate_predictions(EXAMPLES[:3], fake_predict, path, batch_size=2, method="sft", progress=False)
    with pytest.raises(UserError, match="holds predictions of method 'sft', not 'flythinker'"):
        generate_predictions(EXAMPLES, fake_predict, path, method="flythinker", progress=False)
    with pytest.raises(UserError, match="occurs more than once"):
        generate_predictions(EXAMPLES[:2] * 2, fake_predict, tmp_path / "q.jsonl", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed prediction line"):
        generate_predictions(EXAMPLES, fake_predict, bad, progress=False)
    with pytest.raises(RuntimeError, match="returned 1 predictions for 2"):
        generate_predictions(EXAMPLES, lambda b: ["x"], tmp_path / "r.jsonl", batch_size=2, progress=False)


def test_decode_new_tokens_cuts_at_eos(tokenizer):
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert decode_new_tokens(ids + [eos] + ids + [pad, pad], tokenizer, [eos]) == "hello world"
    assert decode_new_tokens(ids, tokenizer, [eos]) == "hello world"


# ----------------------------------------------------------------------------------------------------------------
# integration: tiny checkpoint + data layer + decode loop


def test_generate_cli_on_tiny_checkpoint(tmp_path):
    from flythinker import FlyThinker
    from flythinker.cli.main import main
    from flythinker.testing import tiny_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = FlyThinker(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1), tokenizer=tok)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps({"id": f"d{i}", "user_id": f"u{i % 2}", "input": f"Write a review of album {i}.",
                                "output": f"I loved album {i}; the melodies are warm.",
                                "profile": [{"text": f"Earlier review {j} about songs."} for j in range(2)]}) + "\n" for i in range(5))
    out = tmp_path / "preds.jsonl"
    argv = ["generate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "2", "--no-progress", "--data.retrieval", "recency", "--data.profile_tokens", "64",
            "--data.query_tokens", "32"]
    assert main(argv) == 0
    full = out.read_bytes()
    recs = [json.loads(x) for x in full.splitlines()]
    assert [r["id"] for r in recs] == [f"d{i}" for i in range(5)]
    assert {r["method"] for r in recs} == {"flythinker"}  # from the checkpoint: it has a Reasoner
    assert recs[0]["reference"] == "I loved album 0; the melodies are warm."
    assert all(isinstance(r["prediction"], str) for r in recs)
    # A kill after the first chunk and mid-way through writing the next: the resumed file is identical (greedy).
    lines = full.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:10])
    assert main(argv) == 0
    assert out.read_bytes() == full
    # Same predictions as calling the model directly on the data layer's prompts.
    from flythinker.data import DataConfig, load_examples
    from flythinker.decoding import DecodeConfig
    from flythinker.inference import model_predict_fn

    loaded = FlyThinker.from_pretrained(ckpt).eval()
    exs = load_examples(str(data))
    cfg = DataConfig(retrieval="recency", profile_tokens=64, query_tokens=32)
    fn = model_predict_fn(loaded, loaded.tokenizer, cfg, DecodeConfig(max_new_tokens=6, batch_size=2, seed=0),
                          [e.id for e in exs])
    assert fn(exs[:2]) == [r["prediction"] for r in recs[:2]]
