"""`flythinker demo --quick` end to end on tiny models (the real default models are exercised by slow tests)."""

import json

import pytest

from flythinker.cli.main import main


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


def test_demo_bad_data_dir_is_one_line_error(tmp_path, capsys):
    assert main(["demo", "--quick", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]


def _demo_config(argv):
    import argparse

    from flythinker.cli.demo import add_cli, demo_config

    parser = argparse.ArgumentParser()
    add_cli(parser)
    return demo_config(parser.parse_args(argv))


def test_quick_preset_keeps_a_flag_equal_to_the_plain_default(tmp_path):
    """Regression: `--quick --train.grad_accum 4` used to be dropped because 4 is the full demo's default (the
    preset's is 2); a flag now overrides the preset whatever its value."""
    from flythinker.experiments.demo import DemoConfig, quick_preset

    plain, quick = DemoConfig(), quick_preset(DemoConfig())
    assert plain.train.grad_accum == 4 and quick.train.grad_accum == 2
    assert _demo_config(["--quick"]).train.grad_accum == 2
    assert _demo_config(["--quick", "--train.grad_accum", "4"]).train.grad_accum == 4
    assert _demo_config(["--quick", "--train_examples", str(plain.train_examples)]).train_examples == \
        plain.train_examples
    # YAML sits between the preset and the flags, and overrides only what it names
    y = tmp_path / "d.yaml"
    y.write_text("train: {grad_accum: 4}\ndata: {k: 3}\n")
    cfg = _demo_config(["--quick", "--config", str(y), "--data.k", "1"])
    assert cfg.train.grad_accum == 4 and cfg.data.k == 1 and cfg.train.lr_generator == quick.train.lr_generator
    # the shortcuts land in the nested fields
    cfg = _demo_config(["--data", "/some/dir", "--generator", "gdir", "--reasoner", "2"])
    assert cfg.data_dir == "/some/dir" and cfg.model.generator == "gdir" and cfg.model.reasoner == "2"
