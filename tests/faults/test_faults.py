"""Every row of the fault table (rows_*.py) through the CLI: exit code != 0, one stderr line without a traceback,
protected files untouched."""

from __future__ import annotations

import contextlib
import importlib
import json
import pkgutil
from pathlib import Path

import pytest

from flythinker.cli.main import main

from . import harness
from .harness import Row, World

ROW_MODULES = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("rows_"))
ROWS: list[Row] = [r for name in ROW_MODULES for r in importlib.import_module(f"{__package__}.{name}").ROWS]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from flythinker import FlyThinker
    from flythinker.testing import tiny_lm, tiny_tokenizer

    root = tmp_path_factory.mktemp("faults")
    tok = tiny_tokenizer()
    ckpt, sft = root / "ckpt", root / "sft"
    FlyThinker(tiny_lm("llama", seed=1, max_positions=2048), tiny_lm("llama", seed=2, num_layers=1,
                                                                      max_positions=2048),
               tokenizer=tok).save_pretrained(ckpt)
    FlyThinker(tiny_lm("llama", seed=1, max_positions=2048), None, tokenizer=tok).save_pretrained(sft)
    gen_dir = root / "gen"
    tiny_lm("llama", seed=1, num_layers=2, max_positions=2048).save_pretrained(gen_dir)
    tok.save_pretrained(gen_dir)
    data = harness.write_jsonl(root / "data.jsonl", [
        {"id": f"d{i}", "user_id": f"u{i % 2}", "input": f"Write a review of album {i}.",
         "output": f"I loved album {i}; the melodies are warm.",
         "profile": [{"text": f"Earlier review {j} about songs."} for j in range(2)]} for i in range(4)])
    preds = [{"id": f"d{i}", "user_id": f"u{i % 2}", "reference": f"I loved album {i}; the melodies are warm."}
             for i in range(4)]
    a = harness.write_jsonl(root / "a.jsonl", [{**r, "method": "A", "prediction": "I loved it, warm songs."}
                                               for r in preds])
    b = harness.write_jsonl(root / "b.jsonl", [{**r, "method": "B", "prediction": "Bad album."} for r in preds])
    return World(root=root, ckpt=ckpt, sft_ckpt=sft, gen_dir=gen_dir, data=data, preds_a=a, preds_b=b)


def test_the_table_is_large_enough():
    assert len(ROWS) >= 40, f"{len(ROWS)} rows"
    names = [r.name for r in ROWS]
    assert len(set(names)) == len(names), "row names must be unique"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_fault(row: Row, world: World, capsys):
    d = world.tmp(row.name)
    if row.setup is not None:
        row.setup(world, d)
    shared = [world.data, world.preds_a, world.preds_b, world.ckpt / "flythinker.json"]
    protected = shared + list(row.protect(world, d))
    before = harness.digest(protected)
    capsys.readouterr()
    ctx = row.context(world, d) if row.context is not None else contextlib.nullcontext()
    with ctx:
        rc = main(row.argv(world, d))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc != 0, f"exit code {rc}; stderr: {err!r}"
    assert "Traceback" not in err, err
    errors = [x for x in lines if x.startswith("flythinker: error:")]
    assert len(errors) == 1 and len(lines) == 1, f"expected one error line, got: {json.dumps(lines, indent=1)}"
    assert row.expect.lower() in errors[0].lower(), f"{row.expect!r} not in {errors[0]!r}"
    assert harness.digest(protected) == before, "a protected file changed"
    if row.check is not None:
        row.check(world, d)
