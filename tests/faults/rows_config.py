"""Fault rows for the config layer shared by every verb (files, numbers, flags), `data inspect`, `study`'s plan
check, `demo` and `bench`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flythinker.safeio import exclusive_lock

from .harness import Row, World, write_jsonl


def _file(name: str, content: bytes | str):
    def setup(w: World, d: Path) -> None:
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def _study_root(w: World, d: Path) -> None:
    recs = json.loads("[" + ",".join(w.data.read_text().splitlines()) + "]")
    for part in ("train", "dev"):
        write_jsonl(d / "data" / "user" / f"{part}.jsonl", recs)


def _no_out(w: World, d: Path) -> None:
    assert not (d / "out").exists(), "the study created its results folder before failing"


def _train(w: World, d: Path, *extra: str) -> list[str]:
    return ["train", "--train_data", str(w.data), "--model.generator", str(w.gen_dir), "--model.reasoner", "1",
            "--train.out_dir", str(d / "run"), "--train.progress", "false", "--train.max_steps", "1", *extra]


ROWS = [
    Row("config-binary-file", lambda w, d: _train(w, d, "--config", str(d / "c.yaml")), "binary",
        setup=_file("c.yaml", b"\x00\x01\x02model: {}\n")),
    Row("config-not-utf8", lambda w, d: _train(w, d, "--config", str(d / "c.yaml")), "not UTF-8",
        setup=_file("c.yaml", b"model:\n  generator: caf\xe9\n")),
    Row("config-top-level-list", lambda w, d: _train(w, d, "--config", str(d / "c.yaml")), "top level must be",
        setup=_file("c.yaml", "- 1\n- 2\n")),
    Row("config-bad-yaml", lambda w, d: _train(w, d, "--config", str(d / "c.yaml")), "invalid YAML",
        setup=_file("c.yaml", "train:\n  lr_generator: [1,\n")),
    Row("config-missing", lambda w, d: _train(w, d, "--config", str(d / "nope.yaml")), "not found"),
    Row("config-is-a-directory", lambda w, d: _train(w, d, "--config", str(d)), "not a regular file"),
    Row("config-unknown-key", lambda w, d: _train(w, d, "--config", str(d / "c.yaml")), "lr_generatr",
        setup=_file("c.yaml", "train:\n  lr_generatr: 1.0\n")),
    Row("config-yaml-nan-lam", lambda w, d: _train(w, d, "--config", str(d / "c.yaml")), "finite",
        setup=_file("c.yaml", "model:\n  fusion: {lam: .nan}\n"), check=lambda w, d: _no_run(d)),
    Row("flag-nan-lam", lambda w, d: _train(w, d, "--model.fusion.lam", "nan"), "finite",
        check=lambda w, d: _no_run(d)),
    Row("flag-inf-lr", lambda w, d: _train(w, d, "--train.lr_generator", "inf"), "finite",
        check=lambda w, d: _no_run(d)),
    Row("flag-bool-for-int", lambda w, d: _train(w, d, "--train.batch_size", "true"), "expected int"),
    Row("flag-float-for-int", lambda w, d: _train(w, d, "--train.grad_accum", "1.5"), "expected int"),
    Row("flag-bad-scope", lambda w, d: _train(w, d, "--model.fusion.scope", "sideways"), "scope"),
    Row("flag-unknown", lambda w, d: _train(w, d, "--train.lr", "1"), "unrecognized"),
    Row("flag-negative-k", lambda w, d: _train(w, d, "--data.k", "-1"), "k must be"),
    Row("unknown-verb", lambda w, d: ["trian"], "unknown verb"),
    Row("data-lone-surrogate", lambda w, d: ["data", "inspect", str(d / "s.jsonl"), "--tokenizer", "tiny"],
        "surrogate", setup=_file("s.jsonl", '{"id": "x", "user_id": "u", "input": "bad \\ud800 text", '
                                           '"output": "o", "profile": [{"text": "t"}]}\n')),
    Row("data-not-utf8", lambda w, d: ["data", "inspect", str(d / "s.jsonl"), "--tokenizer", "tiny"],
        "s.jsonl", setup=_file("s.jsonl", b'{"id": "x", "input": "caf\xe9", "output": "o", "profile": []}\n')),
    Row("data-empty-dir", lambda w, d: ["data", "inspect", str(d), "--tokenizer", "tiny"], str("data")),
    Row("data-fifo", lambda w, d: ["data", "inspect", str(d / "f.jsonl"), "--tokenizer", "tiny"], "pipe",
        setup=lambda w, d: os.mkfifo(d / "f.jsonl")),
    Row("config-fifo", lambda w, d: _train(w, d, "--config", str(d / "c.yaml")), "not a regular file",
        setup=lambda w, d: os.mkfifo(d / "c.yaml")),
    Row("study-locked", lambda w, d: ["study", "--data_root", str(d / "data"), "--out", str(d / "out"),
                                      "--methods", "sft", "--splits", "user"], "in use",
        setup=lambda w, d: (_study_root(w, d), (d / "out").mkdir()),
        context=lambda w, d: exclusive_lock(d / "out", "study out")),
    Row("demo-locked", lambda w, d: ["demo", "--quick", "--out", str(d / "o")], "in use",
        setup=lambda w, d: (d / "o").mkdir(), context=lambda w, d: exclusive_lock(d / "o", "demo out")),
    Row("study-bogus-split", lambda w, d: ["study", "--data_root", str(d / "data"), "--out", str(d / "out"),
                                           "--splits", "user,bogus", "--methods", "sft"], "bogus",
        setup=_study_root, check=_no_out),
    Row("study-unknown-method", lambda w, d: ["study", "--data_root", str(d / "data"), "--out", str(d / "out"),
                                              "--methods", "sft,cot2"], "unknown method",
        setup=_study_root, check=_no_out),
    Row("study-bad-override", lambda w, d: ["study", "--config", str(d / "s.yaml")], "lamda", setup=_file(
        "s.yaml", "variants: [{name: x, overrides: {model.fusion.lamda: 1}}]\n"), check=_no_out),
    Row("study-override-section", lambda w, d: ["study", "--config", str(d / "s.yaml")], "must start with",
        setup=_file("s.yaml", "variants: [{name: x, overrides: {lam: 1}}]\n"), check=_no_out),
    Row("study-out-is-a-file", lambda w, d: ["study", "--data_root", str(d / "data"), "--out", str(d / "o.txt"),
                                             "--methods", "sft", "--splits", "user"], "not a directory",
        setup=lambda w, d: (_study_root(w, d), (d / "o.txt").write_text("keep me\n")),
        protect=lambda w, d: [d / "o.txt"]),
    Row("study-missing-root", lambda w, d: ["study", "--data_root", str(d / "none"), "--out", str(d / "out")],
        "not a directory", check=_no_out),
    Row("demo-missing-data", lambda w, d: ["demo", "--quick", "--data", str(d / "none"), "--out", str(d / "o")],
        "not a directory"),
    Row("demo-bad-decode", lambda w, d: ["demo", "--quick", "--decode.top_p", "0", "--out", str(d / "o")],
        "top_p"),
    Row("bench-new-tokens", lambda w, d: ["bench", "decode", "--model", "tiny", "--new-tokens", "1"],
        "--new-tokens"),
    Row("bench-config-unknown", lambda w, d: ["bench", "train", "--config", str(d / "b.yaml")], "tokns",
        setup=_file("b.yaml", "model: tiny\ntokns: 8\n")),
    Row("bench-bad-model", lambda w, d: ["bench", "train", "--model", "huge"], "must be one of"),
]


def _no_run(d: Path) -> None:
    assert not (d / "run").exists(), "training started although a setting was invalid"
