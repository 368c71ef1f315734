"""The fault-injection harness: a table of bad or unlucky inputs, each run through the CLI in-process, each checked
against the rule: exit code != 0, exactly one stderr line ("flythinker: error: ..." naming what and where), no
"Traceback", and every file the row protects byte-identical afterwards.

A row module (rows_*.py) defines ROWS: a list of `Row`. `world` (see `World`) holds the shared tiny artefacts: a
saved checkpoint, a dataset, a tiny Generator directory, prediction files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class World:
    root: Path
    ckpt: Path            # a saved FlyThinker (tiny Generator + 1-layer Reasoner, with tokenizer)
    sft_ckpt: Path        # a saved SFT model (no Reasoner)
    gen_dir: Path         # a tiny Generator directory with tokenizer (for --model.generator)
    data: Path            # generic JSONL dataset, 4 examples, 2 users
    preds_a: Path         # predictions of method A for data
    preds_b: Path         # predictions of method B for data

    def tmp(self, name: str) -> Path:
        p = self.root / "rows" / name
        p.mkdir(parents=True, exist_ok=True)
        return p


@dataclass
class Row:
    name: str
    """Unique id of the row (the test id)."""
    argv: Callable[[World, Path], list[str]]
    """The CLI arguments (after `flythinker`), given the world and this row's own empty folder."""
    expect: str
    """A substring the one error line must contain (case-insensitive): what went wrong and where."""
    setup: Callable[[World, Path], None] | None = None
    """Prepares this row's folder (bad files, an occupied lock, ...) before the command runs."""
    protect: Callable[[World, Path], list[Path]] = field(default=lambda w, d: [])
    """Files that must be byte-identical after the command (defaults: none beyond the world's)."""
    check: Callable[[World, Path], None] | None = None
    """Extra assertions after the command (e.g. no checkpoint was written)."""
    context: Callable[[World, Path], Any] | None = None
    """A context manager factory active while the command runs (e.g. holding a lock)."""


def digest(paths: list[Path]) -> dict[str, str | None]:
    out = {}
    for p in paths:
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
