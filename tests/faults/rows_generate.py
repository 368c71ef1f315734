"""Fault rows for `flythinker generate` (and the predictions reader behind `evaluate`): an --out that is not ours to
resume (notes, a dataset, another run's predictions, a special file, a locked one), a damaged checkpoint, bad data
and flags. Each must fail with one line, before the checkpoint loads where it can, and leave every file it names
byte-identical; a damaged checkpoint must not create --out at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from flythinker.cli.main import main
from flythinker.safeio import exclusive_lock

from .harness import Row, World, write_jsonl

OUT = "p.jsonl"


def _gen(w: World, d: Path, *extra: str, out: str | Path | None = None, ckpt: Path | None = None) -> list[str]:
    return ["generate", "--checkpoint", str(ckpt or w.ckpt), "--data", str(w.data), "--out", str(out or d / OUT),
            "--max-new-tokens", "2", "--batch-size", "2", "--no-progress", *extra]


def _file(name: str, content: bytes | str):
    def setup(w: World, d: Path) -> None:
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def _protect(*names: str):
    return lambda w, d: [d / n for n in names]


def _absent(p: Path) -> None:
    assert not p.exists(), f"{p} was created although the command failed before generating"


def _no_out(w: World, d: Path) -> None:
    _absent(d / OUT)


def _generated(*extra: str, ckpt: str | None = None):
    """Setup: a real predictions file of this tool in d/p.jsonl (2 of the 4 examples), written by `generate`."""
    def setup(w: World, d: Path) -> None:
        c = d / ckpt if ckpt else None
        if ckpt:
            shutil.copytree(w.ckpt, c)
        assert main(_gen(w, d, "--limit", "2", *extra, ckpt=c)) == 0
    return setup


def _generated_then(edit):
    """Setup: a real predictions file, then `edit(lines) -> bytes` applied to it."""
    def setup(w: World, d: Path) -> None:
        _generated()(w, d)
        p = d / OUT
        p.write_bytes(edit(p.read_bytes().splitlines(keepends=True)))
    return setup


def _retrain(w: World, d: Path) -> None:
    """Setup: predictions of a copy of the checkpoint, then the copy re-saved with other weights (retrained)."""
    _generated(ckpt="ckpt")(w, d)
    from flythinker import FlyThinker
    from flythinker.testing import tiny_lm, tiny_tokenizer

    FlyThinker(tiny_lm("llama", seed=7, max_positions=2048), tiny_lm("llama", seed=2, num_layers=1,
                                                                      max_positions=2048),
               tokenizer=tiny_tokenizer()).save_pretrained(d / "ckpt")


def _damaged_ckpt(damage):
    def setup(w: World, d: Path) -> None:
        shutil.copytree(w.ckpt, d / "ckpt")
        damage(d / "ckpt")
    return setup


def _cut(p: Path, n: int) -> None:
    p.write_bytes(p.read_bytes()[:n])


def _hand_written(w: World, d: Path) -> None:
    """Setup: a hand-written predictions file of method flythinker, without the run fingerprints."""
    recs = [json.loads(x) for x in w.preds_a.read_text().splitlines()]
    write_jsonl(d / OUT, [{**r, "method": "flythinker"} for r in recs])


def _locked(w: World, d: Path):
    return exclusive_lock(d / OUT, "test")


@contextlib.contextmanager
def _pipe(w: World, d: Path):
    """An open pipe whose write end is --out, as `--out /dev/stdout` is when stdout goes into `| cat`."""
    r, wr = os.pipe()
    (d / "fd").write_text(f"/proc/self/fd/{wr}")
    try:
        yield
    finally:
        os.close(r)
        os.close(wr)


def _fifo(w: World, d: Path) -> None:
    os.mkfifo(d / "fifo")


def _data_dir(w: World, d: Path) -> None:
    (d / "data").mkdir()
    shutil.copy(w.data, d / "data" / "train.jsonl")


def _pred_file(content: bytes):
    return _file("preds.jsonl", content)


def _evaluate(w: World, d: Path, *files: Path) -> list[str]:
    return ["evaluate", *map(str, files), "--out", str(d / "eval"), "--metrics", "rouge1", "--segments", "none"]


_DATASET_LINE = json.dumps({"id": "x1", "user_id": "u", "input": "Write.", "output": "Text.", "profile": []})
_GOOD = b'{"id": "d0", "prediction": "p", "reference": "r"}\n'

ROWS = [
    # --out holds something that is not ours: refuse, change nothing (not even a "torn" last line)
    Row("gen-out-notes-txt", lambda w, d: _gen(w, d, out=d / "notes.txt"), "notes.txt:1: not a predictions file",
        setup=_file("notes.txt", "a\nimportant"), protect=_protect("notes.txt")),
    Row("gen-out-one-line-json-dataset", lambda w, d: _gen(w, d, out=d / "mydata.json"),
        "mydata.json:1: not a predictions file", setup=_file("mydata.json", f"[{_DATASET_LINE}]"),
        protect=_protect("mydata.json")),
    Row("gen-out-one-record-no-newline", lambda w, d: _gen(w, d, out=d / "mydata.json"),
        "mydata.json:1: not a predictions file", setup=_file("mydata.json", _DATASET_LINE),
        protect=_protect("mydata.json")),
    Row("gen-out-jsonl-dataset", lambda w, d: _gen(w, d, out=d / "copy.jsonl"),
        "copy.jsonl:1: not a predictions file", setup=lambda w, d: shutil.copy(w.data, d / "copy.jsonl"),
        protect=_protect("copy.jsonl")),
    Row("gen-out-ours-with-foreign-tail", lambda w, d: _gen(w, d), "p.jsonl:3: not a predictions file",
        setup=_generated_then(lambda ls: b"".join(ls) + b"my notes"), protect=_protect(OUT)),
    Row("gen-out-blank-line", lambda w, d: _gen(w, d), "p.jsonl:2: not a predictions file",
        setup=_generated_then(lambda ls: ls[0] + b"\n" + ls[1]), protect=_protect(OUT)),
    Row("gen-out-duplicate-ids", lambda w, d: _gen(w, d), "p.jsonl:3: duplicate id 'd0'",
        setup=_generated_then(lambda ls: b"".join(ls) + ls[0]), protect=_protect(OUT)),
    Row("gen-out-not-utf8", lambda w, d: _gen(w, d), "p.jsonl:2: not UTF-8",
        setup=_generated_then(lambda ls: ls[0] + ls[1].replace(b"album", b"alb\xffm")), protect=_protect(OUT)),
    Row("gen-out-lone-surrogate", lambda w, d: _gen(w, d), "p.jsonl:2: contains an invalid character",
        setup=_generated_then(lambda ls: ls[0] + ls[1].replace(b"album", b"alb\\ud800um")), protect=_protect(OUT)),
    Row("gen-out-is-the-data", lambda w, d: _gen(w, d, out=w.data), "would destroy the dataset"),
    Row("gen-out-inside-data-dir", lambda w, d: ["generate", "--checkpoint", str(w.ckpt), "--data", str(d / "data"),
                                                 "--out", str(d / "data" / "preds.jsonl"), "--no-progress"],
        "inside the --data directory", setup=_data_dir, protect=_protect("data/train.jsonl"),
        check=lambda w, d: _absent(d / "data" / "preds.jsonl")),
    # --out from another run: refuse naming what differs
    Row("gen-resume-other-checkpoint", lambda w, d: _gen(w, d, "--method-name", "m", ckpt=w.sft_ckpt),
        "the checkpoint changed (file", setup=_generated("--method-name", "m"), protect=_protect(OUT)),
    Row("gen-resume-retrained-checkpoint", lambda w, d: _gen(w, d, ckpt=d / "ckpt"), "the checkpoint changed (file",
        setup=_retrain, protect=_protect(OUT)),
    Row("gen-resume-other-decode", lambda w, d: _gen(w, d, "--max-new-tokens", "3"), "the decode settings changed",
        setup=_generated(), protect=_protect(OUT)),
    Row("gen-resume-sampling", lambda w, d: _gen(w, d, "--do-sample"), "the decode settings changed", setup=_generated(),
        protect=_protect(OUT)),
    Row("gen-resume-other-prompt", lambda w, d: _gen(w, d, "--data.k", "1"), "the data or prompt settings changed",
        setup=_generated(), protect=_protect(OUT)),
    Row("gen-resume-other-method", lambda w, d: _gen(w, d, out=w.preds_a), "holds predictions of method 'A'"),
    Row("gen-resume-no-run", lambda w, d: _gen(w, d), "no 'run' fingerprint", setup=_hand_written,
        protect=_protect(OUT)),
    # locks and special files
    Row("gen-out-locked", lambda w, d: _gen(w, d), "is in use by another flythinker process", setup=_generated(),
        protect=_protect(OUT), context=_locked),
    Row("gen-out-locked-fresh", lambda w, d: _gen(w, d), "is in use by another flythinker process",
        context=_locked, check=_no_out),
    Row("gen-out-fifo", lambda w, d: _gen(w, d, out=d / "fifo"), "is a pipe (FIFO)", setup=_fifo),
    Row("gen-out-dev-full", lambda w, d: _gen(w, d, out="/dev/full"), "is a character device"),
    Row("gen-out-stdout-pipe", lambda w, d: _gen(w, d, out=(d / "fd").read_text()), "is a pipe (FIFO)",
        context=_pipe),
    Row("gen-out-directory", lambda w, d: _gen(w, d, out=d), "is a directory"),
    Row("gen-out-parent-is-file", lambda w, d: _gen(w, d, out=d / "f.txt" / "sub" / OUT), "f.txt is not a directory",
        setup=_file("f.txt", "keep"), protect=_protect("f.txt")),
    # a damaged checkpoint: one line naming the file, and --out never created
    Row("gen-ckpt-cut-safetensors", lambda w, d: _gen(w, d, ckpt=d / "ckpt"), "generator/model.safetensors: damaged",
        setup=_damaged_ckpt(lambda c: _cut(c / "generator" / "model.safetensors", 3000)), check=_no_out),
    Row("gen-ckpt-cut-reasoner", lambda w, d: _gen(w, d, ckpt=d / "ckpt"), "reasoner/model.safetensors: damaged",
        setup=_damaged_ckpt(lambda c: _cut(c / "reasoner" / "model.safetensors", 7)), check=_no_out),
    Row("gen-ckpt-json-not-json", lambda w, d: _gen(w, d, ckpt=d / "ckpt"), "flythinker.json: checkpoint config is "
        "not valid JSON", setup=_damaged_ckpt(lambda c: (c / "flythinker.json").write_text('{"flythinker": ')),
        check=_no_out),
    Row("gen-ckpt-json-no-key", lambda w, d: _gen(w, d, ckpt=d / "ckpt"), "flythinker.json: no 'flythinker'",
        setup=_damaged_ckpt(lambda c: (c / "flythinker.json").write_text('{"has_reasoner": true}')), check=_no_out),
    Row("gen-ckpt-no-generator", lambda w, d: _gen(w, d, ckpt=d / "ckpt"), "generator: missing",
        setup=_damaged_ckpt(lambda c: shutil.rmtree(c / "generator")), check=_no_out),
    Row("gen-ckpt-bad-train-config", lambda w, d: _gen(w, d, ckpt=d / "ckpt"), "train_config.json",
        setup=_damaged_ckpt(lambda c: (c / "train_config.json").write_bytes(b"\x00\x01")), check=_no_out),
    Row("gen-ckpt-missing", lambda w, d: _gen(w, d, ckpt=d / "nope"), "not found", check=_no_out),
    # data and flags
    Row("gen-data-dir-without-data", lambda w, d: ["generate", "--checkpoint", str(w.ckpt), "--data",
                                                   str(d / "empty"), "--out", str(d / "out" / OUT), "--no-progress"],
        "no data files", setup=lambda w, d: (d / "empty").mkdir(), check=lambda w, d: _absent(d / "out")),
    Row("gen-data-binary", lambda w, d: ["generate", "--checkpoint", str(w.ckpt), "--data", str(d / "b.jsonl"),
                                         "--out", str(d / OUT), "--no-progress"], "b.jsonl",
        setup=_file("b.jsonl", b"\x00\x01\xff\xfe"), check=_no_out),
    Row("gen-limit-negative", lambda w, d: _gen(w, d, "--limit", "-1"), "--limit must be >= 0", check=_no_out),
    Row("gen-batch-size-zero", lambda w, d: _gen(w, d, "--batch-size", "0"), "--batch-size must be >= 1",
        check=_no_out),
    Row("gen-temperature-nan", lambda w, d: _gen(w, d, "--temperature", "nan"), "--temperature", check=_no_out),
    Row("gen-config-binary", lambda w, d: _gen(w, d, "--config", str(d / "c.yaml")), "binary",
        setup=_file("c.yaml", b"\x00\x01data: {}\n"), check=_no_out),
    # the predictions reader behind `evaluate`
    Row("eval-preds-not-utf8", lambda w, d: _evaluate(w, d, d / "preds.jsonl"), "preds.jsonl:2: not UTF-8",
        setup=_pred_file(_GOOD + b'{"id": "d1", "prediction": "caf\xe9", "reference": "r"}\n'),
        protect=_protect("preds.jsonl")),
    Row("eval-preds-lone-surrogate", lambda w, d: _evaluate(w, d, d / "preds.jsonl"),
        "preds.jsonl:2: contains an invalid character",
        setup=_pred_file(_GOOD + b'{"id": "d1", "prediction": "\\ud800", "reference": "r"}\n'),
        protect=_protect("preds.jsonl")),
]
