"""`flythinker demo --quick` end to end on tiny models (the real default models are exercised by
test_default_model_real.py)."""

import json

import pytest

from flythinker.cli.main import main

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny_generator_dir(tmp_path, tokenizer):
    from flythinker.testing import tiny_lm

    d = tmp_path / "tinygen"
    tiny_lm("llama", seed=1, num_layers=2, max_positions=2048).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_demo_quick_runs_end_to_end(tmp_path, tiny_generator_dir, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--generator", str(tiny_generator_dir), "--reasoner", "1", "--out", str(out),
               "--bertscore", "false", "--train.progress", "false", "--train_examples", "4", "--eval_examples", "3",
               "--decode.max_new_tokens", "8", "--data.target_tokens", "48", "--data.profile_tokens", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "SFT" in printed and "FlyThinker" in printed and "train s/step" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"SFT", "FlyThinker"}
    assert summary["train_examples"] == 4 and summary["eval_examples"] >= 1
    for method in ("SFT", "FlyThinker"):
        lines = (out / "runs" / method / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == summary["eval_examples"]
        assert (out / "runs" / method / "train" / "final" / "flythinker.json").is_file()
        eff = {r["method"]: r for r in summary["efficiency"]}[method]
        assert eff["train_s_per_step"] > 0 and eff["decode_ms_per_token"] > 0
    assert (out / "eval" / "report.md").is_file() and (out / "eval" / "metrics.json").is_file()
    # user split: no evaluated user was seen in training
    train_users = {json.loads(x)["user_id"] for x in (out / "data" / "user" / "train.jsonl").read_text().splitlines()}
    preds = [json.loads(x) for x in (out / "runs" / "SFT" / "predictions.jsonl").read_text().splitlines()]
    assert not {p["user_id"] for p in preds} & train_users
    # a re-run reuses trained models and predictions (resumable, nothing duplicated)
    assert main(["demo", "--quick", "--generator", str(tiny_generator_dir), "--reasoner", "1", "--out", str(out),
                 "--bertscore", "false", "--train.progress", "false", "--train_examples", "4", "--eval_examples", "3",
                 "--decode.max_new_tokens", "8", "--data.target_tokens", "48",
                 "--data.profile_tokens", "64"]) == 0
    assert "reusing trained model" in capsys.readouterr().out
    assert len((out / "runs" / "SFT" / "predictions.jsonl").read_text().splitlines()) == summary["eval_examples"]
