"""Fault rows for `flythinker evaluate`: bad prediction files, files that are not predictions of the same examples,
bad `--out` targets, bad settings (flags and YAML), an unreachable judge. Every row runs with `--metrics rouge1,bleu
--segments none` (no METEOR/BERTScore/tokenizer) so it is fast, protects its input files and any pre-existing
output, and checks that a refused run left no output folder behind (nothing is written when inputs are refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flythinker.safeio import exclusive_lock

from .harness import Row, World, write_jsonl

FAST = ["--metrics", "rouge1,bleu", "--segments", "none", "--n-boot", "20"]


def _eval(*files, out: str = "out", extra: tuple[str, ...] = ()):
    """argv factory: `evaluate FILES --out <row>/out FAST EXTRA`; a file is a Path, a world attribute name
    ("preds_a") or a name inside the row's folder."""

    def argv(w: World, d: Path) -> list[str]:
        paths = [str(getattr(w, f) if isinstance(f, str) and hasattr(w, f) else d / f) for f in files]
        target = out if out.startswith("/") else str(d / out)
        return ["evaluate", *paths, "--out", target, *FAST, *extra]

    return argv


def _records(w: World, path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _file(name: str, content: bytes | str):
    def setup(w: World, d: Path) -> None:
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def _preds(name: str, edit):
    """A prediction file in the row folder: world.preds_b's records passed through `edit(records)`."""

    def setup(w: World, d: Path) -> None:
        write_jsonl(d / name, edit(_records(w, w.preds_b)))
    return setup


def _no_reference(example_id: str):
    """a_noref.jsonl / b_noref.jsonl: world.preds_a / preds_b with a null reference for `example_id`."""

    def setup(w: World, d: Path) -> None:
        for src, name in ((w.preds_a, "a_noref.jsonl"), (w.preds_b, "b_noref.jsonl")):
            write_jsonl(d / name, [{**r, "reference": None} if r["id"] == example_id else r
                                   for r in _records(w, src)])
    return setup


def _in_row(*names: str):
    return lambda w, d: [d / n for n in names]


def _no_out(w: World, d: Path) -> None:
    assert not (d / "out").exists(), "evaluate created its output folder although the inputs were refused"


def _old_report(w: World, d: Path) -> None:
    (d / "out").mkdir()
    (d / "out" / "metrics.json").write_text('{"old": true}\n')
    (d / "out" / "report.md").write_text("# old report\n")


def _judge_yaml(url: str, **overrides) -> str:
    """A `judge:` section; no retries, so an unreachable endpoint fails in one attempt."""
    keys = {"url": url, "model": "m", "retries": 0, "timeout": 5, **overrides}
    return "judge:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items())


ROWS = [
    # -- the prediction files
    Row("evaluate-pred-missing", _eval("preds_a", "nope.jsonl"), "nope.jsonl: prediction file not found",
        check=_no_out),
    Row("evaluate-pred-directory", _eval("preds_a", "dir.jsonl"), "is a directory",
        setup=lambda w, d: (d / "dir.jsonl").mkdir(), check=_no_out),
    Row("evaluate-pred-fifo", _eval("preds_a", "f.jsonl"), "pipe",
        setup=lambda w, d: os.mkfifo(d / "f.jsonl"), check=_no_out),
    Row("evaluate-pred-binary", _eval("preds_a", "bin.jsonl"), "not UTF-8",
        setup=_file("bin.jsonl", b"\x89PNG\r\n\x1a\n\xff\xfe\x01\x02\n"), protect=_in_row("bin.jsonl"),
        check=_no_out),
    Row("evaluate-pred-empty", _eval("preds_a", "empty.jsonl"), "empty.jsonl: no predictions",
        setup=_file("empty.jsonl", b""), protect=_in_row("empty.jsonl"), check=_no_out),
    Row("evaluate-same-file-twice", _eval("preds_a", "preds_a"), "given twice", check=_no_out),
    Row("evaluate-same-file-other-name", _eval("preds_a", "link.jsonl"), "given twice",
        setup=lambda w, d: os.link(w.preds_a, d / "link.jsonl"), check=_no_out),
    Row("evaluate-two-files-one-method", _eval("preds_a", "a_copy.jsonl"), "two files have method 'A'",
        setup=lambda w, d: (d / "a_copy.jsonl").write_bytes(w.preds_a.read_bytes()), protect=_in_row("a_copy.jsonl"),
        check=_no_out),
    # -- files that are not predictions of the same examples
    Row("evaluate-references-differ", _eval("preds_a", "b_other.jsonl"), "different references for id 'd2'",
        setup=_preds("b_other.jsonl", lambda rs: [{**r, "reference": "Another reference."} if r["id"] == "d2" else r
                                                  for r in rs]),
        protect=_in_row("b_other.jsonl"), check=_no_out),
    Row("evaluate-ids-differ", _eval("preds_a", "b_short.jsonl"), "do not hold the same examples",
        setup=_preds("b_short.jsonl", lambda rs: rs[:3]), protect=_in_row("b_short.jsonl"), check=_no_out),
    Row("evaluate-common-ids-disjoint", _eval("preds_a", "b_other_ids.jsonl", extra=("--common-ids",)),
        "share no example id", setup=_preds("b_other_ids.jsonl", lambda rs: [{**r, "id": "x" + r["id"]} for r in rs]),
        protect=_in_row("b_other_ids.jsonl"), check=_no_out),
    Row("evaluate-empty-reference", _eval("a_noref.jsonl", "b_noref.jsonl"),
        "a_noref.jsonl: id 'd1' has an empty or missing reference", setup=_no_reference("d1"),
        protect=_in_row("a_noref.jsonl", "b_noref.jsonl"), check=_no_out),
    # -- --out
    Row("evaluate-out-is-a-file", _eval("preds_a", "preds_b", out="taken"), "exists and is not a directory",
        setup=_file("taken", "keep me\n"), protect=_in_row("taken")),
    Row("evaluate-out-is-a-device", _eval("preds_a", "preds_b", out="/dev/null"), "exists and is not a directory"),
    Row("evaluate-out-parent-is-a-file", _eval("preds_a", out="taken/sub"), "is not a directory",
        setup=_file("taken", "keep me\n"), protect=_in_row("taken")),
    Row("evaluate-out-metrics-is-a-directory", _eval("preds_a"), "metrics.json: is a directory",
        setup=lambda w, d: (d / "out" / "metrics.json").mkdir(parents=True)),
    Row("evaluate-out-locked", _eval("preds_a", "preds_b"), "in use by another flythinker process",
        setup=_old_report, protect=_in_row("out/metrics.json", "out/report.md"),
        context=lambda w, d: exclusive_lock(d / "out", "--out")),
    # -- settings
    Row("evaluate-metrics-bogus", lambda w, d: _eval("preds_a")(w, d) + ["--metrics", "bogus"],
        "unknown metric 'bogus'", check=_no_out),
    Row("evaluate-baseline-missing", _eval("preds_a", "preds_b", extra=("--baseline", "Z")),
        "--baseline 'Z' is not one of the methods: A, B", check=_no_out),
    Row("evaluate-n-boot-zero", lambda w, d: _eval("preds_a", "preds_b")(w, d) + ["--n-boot", "0"],
        "--n-boot must be", check=_no_out),
    Row("evaluate-seed-negative", _eval("preds_a", "preds_b", extra=("--seed", "-1")), "--seed must be",
        check=_no_out),
    Row("evaluate-confidence-nan", _eval("preds_a", "preds_b", extra=("--confidence", "nan")), "confidence",
        check=_no_out),
    Row("evaluate-config-binary", _eval("preds_a", extra=("--config", "PLACEHOLDER")), "binary",
        setup=_file("c.yaml", b"\x00\x01metrics: [rouge1]\n"), protect=_in_row("c.yaml"), check=_no_out),
    Row("evaluate-config-unknown-key", _eval("preds_a", extra=("--config", "PLACEHOLDER")), "bootstrap_samples",
        setup=_file("c.yaml", "bootstrap_samples: 10\n"), protect=_in_row("c.yaml"), check=_no_out),
    Row("evaluate-config-nan", _eval("preds_a", extra=("--config", "PLACEHOLDER")), "finite",
        setup=_file("c.yaml", "confidence: .nan\n"), protect=_in_row("c.yaml"), check=_no_out),
    Row("evaluate-config-judge-timeout-inf", _eval("preds_a", extra=("--config", "PLACEHOLDER")), "timeout",
        setup=_file("c.yaml", _judge_yaml("http://127.0.0.1:9/v1", timeout=".inf")),
        protect=_in_row("c.yaml"), check=_no_out),
    # -- the judge
    Row("evaluate-judge-unreachable", _eval("preds_a", "preds_b", extra=("--config", "PLACEHOLDER")),
        "judge endpoint http://127.0.0.1:9/v1/chat/completions failed",
        setup=_file("c.yaml", _judge_yaml("http://127.0.0.1:9/v1")), protect=_in_row("c.yaml"), check=_no_out),
    Row("evaluate-judge-url-not-http", _eval("preds_a", extra=("--judge-url", "ftp://127.0.0.1/v1", "--judge-model",
                                                               "m")),
        "not an http(s) URL", check=_no_out),
]


def _config_in_row(row: Row) -> Row:
    """`--config PLACEHOLDER` means the row's own c.yaml (its folder is known only when the row runs)."""
    argv = row.argv

    def with_config(w: World, d: Path) -> list[str]:
        return [str(d / "c.yaml") if a == "PLACEHOLDER" else a for a in argv(w, d)]

    row.argv = with_config
    return row


ROWS = [_config_in_row(r) for r in ROWS]
