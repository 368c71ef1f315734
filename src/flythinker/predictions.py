"""The predictions JSONL format: one JSON object per line (id, user_id, method, prediction, reference, input), one
resumable writer (`generate_predictions`), the scan a resume starts from, and the one reader every consumer uses
(`read_predictions`: the evaluate verb, experiments).

Resuming: ids already in the file are skipped; a torn last line left by a kill is dropped and rewritten.
Determinism: batches are fixed chunks of the full example list (chunk k = examples[k*B:(k+1)*B]); a resumed run
re-runs only the missing examples of each chunk, and the caller seeds chunk k with `seed + k`, so greedy decoding
gives the same file whether or not the run was interrupted; with sampling only the one chunk cut by the kill can
differ. `generate_predictions` takes any `predict_batch_fn`, so it is model-independent (and tested that way).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .utils import UserError

PredictBatchFn = Callable[[list[Any]], Sequence[str]]
REQUIRED_FIELDS = ("id", "prediction", "reference")


@dataclass
class GenerateStats:
    total: int
    """Examples asked for."""
    skipped: int
    """Already in the file (resumed)."""
    written: int
    """Written by this run."""
    repaired: bool
    """A torn last line was dropped before resuming."""
    out_path: Path


def _field(ex: Any, name: str, default: Any = None) -> Any:
    return ex.get(name, default) if isinstance(ex, dict) else getattr(ex, name, default)


def scan_predictions(out_path: str | Path, repair: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Read an existing prediction file for resuming: (records, whether a torn tail was dropped).

    Anything after the last newline is what a kill left mid-write; it is cut off (when `repair`) so appending
    continues on a clean line boundary. A malformed *complete* line is not a kill artifact: UserError naming it."""
    path = Path(out_path)
    if not path.exists():
        return [], False
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
    repaired = cut < len(data)
    if repaired and repair:
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
    records = []
    for lineno, raw in enumerate(data[:cut].splitlines(), 1):
        if raw.strip():
            rec = parse_line(raw, path, lineno, hint="; fix or remove the file")
            if "id" not in rec:
                raise UserError(f"{path}:{lineno}: not a prediction record (an object with an 'id')")
            records.append(rec)
    return records, repaired


def parse_line(raw: str | bytes, path: Path, lineno: int, hint: str = "") -> dict[str, Any]:
    """One line of a predictions file as a dict; a UserError naming file and line otherwise."""
    try:
        rec = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{path}:{lineno}: malformed prediction line ({e}){hint}") from None
    if not isinstance(rec, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
    return rec


def generate_predictions(examples: Sequence[Any], predict_batch_fn: PredictBatchFn, out_path: str | Path,
                         batch_size: int = 8, method: str | None = None, progress: bool = True) -> GenerateStats:
    """Predict every example not yet in `out_path` and append one JSON line each, flushed per batch.

    examples: objects or dicts with id, user_id, output (the reference) and optionally input.
    predict_batch_fn: list of examples -> one prediction string per example, in order.
    method: stored in every line (the name `flythinker evaluate` reports); must match a resumed file's.
    Re-running after a kill (or a crash inside predict_batch_fn) skips what was written and loses nothing."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1; got {batch_size}")
    ids = [str(_field(ex, "id")) for ex in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"example id {dup!r} occurs more than once; resumable generation needs unique ids")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    existing, repaired = scan_predictions(out_path)
    if method is not None:
        other = {r.get("method") for r in existing} - {method}
        if other:
            raise UserError(f"{out_path} holds predictions of method {min(map(str, other))!r}, not "
                            f"{method!r}; use another --out or the same --method-name")
    done = {str(r["id"]) for r in existing}
    skipped = sum(i in done for i in ids)
    written = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(ids), initial=skipped, disable=not progress, desc=method or "generate", unit="ex")
    try:
        with open(out_path, "a", encoding="utf-8") as f:
            for start in range(0, len(examples), batch_size):
                todo = [ex for ex, i in zip(examples[start:start + batch_size], ids[start:start + batch_size])
                        if i not in done]
                if not todo:
                    continue
                preds = list(predict_batch_fn(todo))
                if len(preds) != len(todo):
                    raise RuntimeError(f"predict_batch_fn returned {len(preds)} predictions for {len(todo)} "
                                       f"examples")
                lines = []
                for ex, pred in zip(todo, preds):
                    rec: dict[str, Any] = {"id": str(_field(ex, "id")), "user_id": _field(ex, "user_id")}
                    if method is not None:
                        rec["method"] = method
                    rec["prediction"] = pred
                    rec["reference"] = _field(ex, "output")
                    if _field(ex, "input") is not None:
                        rec["input"] = _field(ex, "input")  # the instruction, for the LLM judge's rubric
                    lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                # One write per batch, then flush + fsync: a kill loses at most this batch, and leaves at most one
                # torn line, which the next run drops.
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
                written += len(todo)
                bar.update(len(todo))
    finally:
        bar.close()
    return GenerateStats(total=len(ids), skipped=skipped, written=written, repaired=repaired, out_path=out_path)


@dataclass
class PredictionSet:
    """One prediction file: a method's predictions, references and instructions, by example id."""

    method: str
    path: Path
    ids: list[str]
    user_ids: list[Any]
    predictions: list[str | None]
    references: list[str | None]
    inputs: list[str | None]


def read_predictions(path: str | Path) -> PredictionSet:
    """Read one prediction file written by `flythinker generate` (or by hand: id, prediction, reference per line).

    Raises UserError naming the file and line for a malformed line, a missing field, a non-string prediction or a
    duplicate id."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prediction file not found")
    ids: list[str] = []
    user_ids, preds, refs, inputs = [], [], [], []
    methods: set[str] = set()
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = parse_line(line, path, lineno)
            for key in REQUIRED_FIELDS:
                if key not in rec:
                    raise UserError(f"{path}:{lineno}: missing field {key!r} (need {', '.join(REQUIRED_FIELDS)})")
            for key in ("prediction", "reference"):
                if rec[key] is not None and not isinstance(rec[key], str):
                    raise UserError(f"{path}:{lineno}: {key!r} must be a string, got {type(rec[key]).__name__}")
            i = str(rec["id"])
            if i in seen:
                raise UserError(f"{path}:{lineno}: duplicate id {i!r}")
            seen.add(i)
            if rec.get("method") is not None:
                methods.add(str(rec["method"]))
            ids.append(i)
            user_ids.append(rec.get("user_id"))
            preds.append(rec["prediction"])
            refs.append(rec["reference"])
            inputs.append(rec.get("input"))
    if not ids:
        raise UserError(f"{path}: no predictions")
    if len(methods) > 1:
        raise UserError(f"{path}: lines name several methods ({', '.join(sorted(methods))}); one file per method")
    method = methods.pop() if methods else path.stem
    return PredictionSet(method, path, ids, user_ids, preds, refs, inputs)


__all__ = ["GenerateStats", "PredictBatchFn", "PredictionSet", "REQUIRED_FIELDS", "generate_predictions",
           "read_predictions", "scan_predictions"]
