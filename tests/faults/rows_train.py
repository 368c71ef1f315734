"""Fault rows for `flythinker train`: bad data and out_dir, out-of-range settings, an out_dir held by another run,
locked or holding unreadable checkpoints, and a diverging run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flythinker.cli.main import main
from flythinker.safeio import exclusive_lock

from .harness import Row, World, write_jsonl

_DATA = [{"id": f"t{i}", "user_id": f"u{i % 2}", "input": f"Write a review of record {i}.",
          "output": f"Record {i} sounds bright and warm.", "profile": [{"text": "An earlier review of songs."}]}
         for i in range(3)]


def _train(w: World, d: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["train", "--train_data", str(data or d / "data.jsonl"), "--model.generator", str(w.gen_dir),
            "--model.reasoner", "1", "--train.out_dir", str(d / "run"), "--train.progress", "false",
            "--train.threads", "1", "--train.batch_size", "1", "--train.grad_accum", "1",
            "--train.max_steps", "1", *extra]


def _data(w: World, d: Path) -> None:
    write_jsonl(d / "data.jsonl", _DATA)


def _earlier_run(*extra: str, steps: int = 1):
    """Setup: the tiny dataset and a finished earlier run in d/run (step-N checkpoints, final/, log, run.json)."""
    def setup(w: World, d: Path) -> None:
        _data(w, d)
        rc = main(_train(w, d, "--train.max_steps", str(steps), "--train.save_every", "1", *extra))
        assert rc == 0, "the earlier run failed"
    return setup


def _run_files(w: World, d: Path) -> list[Path]:
    run = d / "run"
    return sorted(p for p in run.rglob("*") if p.is_file() and p.name != ".flythinker.lock") if run.is_dir() else []


def _no_run(w: World, d: Path) -> None:
    assert not (d / "run").exists(), "train created its out_dir before failing"


def _nothing_saved(w: World, d: Path) -> None:
    run = d / "run"
    assert not (run / "final").exists() and not (run / "step-000002").exists(), "a NaN checkpoint was written"
    assert (run / "step-000001" / "training_state.pt").is_file()


def _then(setup, change):
    def both(w: World, d: Path) -> None:
        setup(w, d)
        change(w, d)
    return both


def _truncate(rel: str):
    def change(w: World, d: Path) -> None:
        p = d / "run" / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return change


def _write(rel: str, text: str):
    def change(w: World, d: Path) -> None:
        (d / "run" / rel).write_text(text)
    return change


def _drop_generator(w: World, d: Path) -> None:
    shutil.rmtree(d / "run" / "step-000001" / "generator")


def _locked(w: World, d: Path):
    return exclusive_lock(d / "run", "test")


def _setup_dirs(w: World, d: Path) -> None:
    _data(w, d)
    (d / "empty").mkdir()
    (d / "notamodel").mkdir()
    (d / "notamodel" / "config.json").write_text(json.dumps({"hello": 1}))
    (d / "bin.jsonl").write_bytes(b"\x00\x01\x02\xff\xfe")
    (d / "afile").write_text("not a directory\n")
    write_jsonl(d / "other.jsonl", _DATA[:2])


ROWS = [
    # data and paths
    Row("train-data-missing", lambda w, d: _train(w, d, data=d / "nope.jsonl"), "nope.jsonl", check=_no_run),
    Row("train-data-empty-directory", lambda w, d: _train(w, d, data=d / "empty"), "no data files",
        setup=_setup_dirs, check=_no_run),
    Row("train-data-binary", lambda w, d: _train(w, d, data=d / "bin.jsonl"), "bin.jsonl", setup=_setup_dirs,
        check=_no_run),
    Row("train-data-empty-file", lambda w, d: _train(w, d, data=d / "zero.jsonl"), "zero.jsonl",
        setup=lambda w, d: (d / "zero.jsonl").write_text(""), check=_no_run),
    Row("train-out-dir-is-a-file", lambda w, d: _train(w, d, "--train.out_dir", str(d / "afile")),
        "is not a directory", setup=_setup_dirs, protect=lambda w, d: [d / "afile"]),
    Row("train-generator-not-a-model", lambda w, d: _train(w, d, "--model.generator", str(d / "notamodel")),
        "notamodel", setup=_setup_dirs, check=_no_run),
    Row("train-generator-missing", lambda w, d: _train(w, d, "--model.generator", str(d / "nogen")), "nogen",
        setup=_data, check=_no_run),
    Row("train-method-bogus", lambda w, d: _train(w, d, "--model.method", "bogus"), "model.method", setup=_data),
    # out-of-range settings
    Row("train-batch-size-zero", lambda w, d: _train(w, d, "--train.batch_size", "0"), "train.batch_size",
        setup=_data, check=_no_run),
    Row("train-limit-negative", lambda w, d: _train(w, d, "--limit", "-1"), "limit", setup=_data, check=_no_run),
    Row("train-lr-nan", lambda w, d: _train(w, d, "--train.lr_reasoner", "nan"), "lr_reasoner", setup=_data,
        check=_no_run),
    Row("train-lr-negative", lambda w, d: _train(w, d, "--train.lr_generator", "-0.001"), "train.lr_generator",
        setup=_data, check=_no_run),
    Row("train-warmup-ratio-above-one", lambda w, d: _train(w, d, "--train.warmup_ratio", "1.5"),
        "train.warmup_ratio", setup=_data, check=_no_run),
    Row("train-weight-decay-negative", lambda w, d: _train(w, d, "--train.weight_decay", "-1"),
        "train.weight_decay", setup=_data, check=_no_run),
    Row("train-log-every-zero", lambda w, d: _train(w, d, "--train.log_every", "0"), "train.log_every",
        setup=_data, check=_no_run),
    Row("train-keep-checkpoints-negative", lambda w, d: _train(w, d, "--train.keep_checkpoints", "-1"),
        "train.keep_checkpoints", setup=_data, check=_no_run),
    # an out_dir that belongs to another run
    Row("train-fresh-into-another-run", lambda w, d: _train(w, d), "--train.overwrite true",
        setup=_earlier_run(), protect=_run_files),
    Row("train-resume-another-config", lambda w, d: _train(w, d, "--train.resume", "true", "--train.max_steps",
                                                           "2", "--train.lr_generator", "0.01"),
        "train.lr_generator", setup=_earlier_run(), protect=_run_files),
    Row("train-resume-other-data", lambda w, d: _train(w, d, "--train.resume", "true", "--train.max_steps", "2",
                                                       data=d / "other.jsonl"),
        "training data", setup=_then(_earlier_run(), _setup_dirs), protect=_run_files),
    Row("train-out-dir-locked", lambda w, d: _train(w, d, "--train.resume", "true", "--train.max_steps", "2"),
        "in use by another flythinker process", setup=_earlier_run(), protect=_run_files, context=_locked),
    # unreadable checkpoints with nothing earlier to fall back to
    Row("train-resume-truncated-weights", lambda w, d: _train(w, d, "--train.resume", "true", "--train.max_steps",
                                                              "2"),
        "step-000001/generator/model.safetensors is unusable",
        setup=_then(_earlier_run(), _truncate("step-000001/generator/model.safetensors")), protect=_run_files),
    Row("train-resume-truncated-state", lambda w, d: _train(w, d, "--train.resume", "true", "--train.max_steps",
                                                            "2"),
        "step-000001/training_state.pt is unusable",
        setup=_then(_earlier_run(), _truncate("step-000001/training_state.pt")), protect=_run_files),
    Row("train-resume-bad-flythinker-json", lambda w, d: _train(w, d, "--train.resume", "true",
                                                                "--train.max_steps", "2"),
        "flythinker.json is unusable", setup=_then(_earlier_run(), _write("step-000001/flythinker.json", "{x")),
        protect=_run_files),
    Row("train-resume-no-flythinker-key", lambda w, d: _train(w, d, "--train.resume", "true",
                                                              "--train.max_steps", "2"),
        "no 'flythinker' section",
        setup=_then(_earlier_run(), _write("step-000001/flythinker.json", '{"has_reasoner": true}')),
        protect=_run_files),
    Row("train-resume-missing-generator", lambda w, d: _train(w, d, "--train.resume", "true",
                                                              "--train.max_steps", "2"),
        "step-000001/generator", setup=_then(_earlier_run(), _drop_generator), protect=_run_files),
    Row("train-resume-bad-run-record", lambda w, d: _train(w, d, "--train.resume", "true", "--train.max_steps",
                                                           "2"),
        "run.json", setup=_then(_earlier_run(), _write("run.json", "not json")), protect=_run_files),
    # a diverging run: step 1 is saved, step 2 overflows to NaN and must not be
    Row("train-diverges-to-nan", lambda w, d: _train(w, d, "--train.max_steps", "3", "--train.save_every", "1",
                                                     "--train.lr_generator", "1e30", "--train.lr_reasoner", "1e30",
                                                     "--train.warmup_ratio", "0"),
        "diverged at step 2", setup=_data, check=_nothing_saved),
]
