"""The predictions JSONL format: one JSON object per line (id, user_id, method, prediction, reference, input, run),
one resumable writer (`generate_predictions`), the read-only check a resume starts from (`scan_predictions`,
`check_resume`), and the one reader every consumer uses (`read_predictions`: the evaluate verb, experiments).

Resuming never destroys what it did not write: before anything is modified, the whole existing file is streamed
(line by line, never read whole: an output target can be large) and every complete line must be a record of this
writer (its fields, its method, its `run`). Only a torn *last* line that is the prefix of such a record (what a kill
leaves mid-write) is dropped and rewritten; anything else is refused with one line naming file and line, and the
file is left as it was. The writer holds `<out>.lock` (safeio.exclusive_lock) for the whole check-and-append, so
two processes never interleave into one file.

`run` is what makes a resume safe across invocations: a small object of fingerprints (the CLI records the
checkpoint, the data + prompt settings and the decode settings) stored in every line; a resume whose `run` differs
is refused, naming what differs, instead of silently mixing two models or settings in one file. Hand-written files
and files without `run` stay readable by `read_predictions`, which ignores the field.

Determinism: batches are fixed chunks of the full example list (chunk k = examples[k*B:(k+1)*B]); a resumed run
re-runs only the missing examples of each chunk, and the caller seeds chunk k with `seed + k`, so greedy decoding
gives the same file whether or not the run was interrupted; with sampling only the one chunk cut by the kill can
differ. `generate_predictions` takes any `predict_batch_fn`, so it is model-independent (and tested that way).

Data-parallel generation (`accelerate launch --num_processes N ... generate`): process r takes the chunks k with
k % N == r (`shard_examples`: whole chunks, so every batch, its padding and its chunk seed are the single-process
run's) and writes them to its own resumable file `<out>.shard-<r>-of-<N>.jsonl` (`shard_path`); when all are done
the main process merges them with what --out already holds into --out in input order, atomically, and removes the
shards (`merge_shards`). The merged file is byte for byte the file one process writes.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .safeio import atomic_write_text, check_json_text, check_output_file, decode_line, exclusive_lock
from .utils import UserError

# A batch of examples -> one prediction per example: its text, or {"text": str, "extra": {...}} with side outputs
# (stored under "extra", never scored).
PredictBatchFn = Callable[[list[Any]], Sequence[Any]]
REQUIRED_FIELDS = ("id", "prediction", "reference")
"""What `read_predictions` needs of a line (hand-written files carry just these)."""
RECORD_FIELDS = ("id", "user_id", "method", "prediction", "reference", "input", "extra", "run")
"""Every field `generate_predictions` writes, in the order it writes them."""
WRITTEN_FIELDS = ("id", "user_id", "prediction", "reference")
"""The fields every line written by `generate_predictions` carries (method, input and run are optional)."""
MAX_LINE_BYTES = 64 << 20
"""A line longer than this is not a prediction record: refused instead of being read into memory."""
LOCK_WHAT = "predictions file"


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


@dataclass
class ResumeScan:
    """What an existing predictions file holds, as found by `scan_predictions` (which changes nothing)."""

    path: Path
    ids: list[str] = field(default_factory=list)
    """Ids of the complete records, in file order."""
    cut: int = 0
    """Byte offset just after the last complete line: where appending continues."""
    size: int = 0
    """The file's size when scanned; `size > cut` means a torn last line (ours) is to be dropped."""

    @property
    def torn(self) -> bool:
        return self.size > self.cut


def _field(ex: Any, name: str, default: Any = None) -> Any:
    return ex.get(name, default) if isinstance(ex, dict) else getattr(ex, name, default)


# ----------------------------------------------------------------------------------------------------------------
# reading lines: streamed, bounded, file:line errors


def _open_regular(path: Path, what: str) -> BinaryIO:
    """`path` opened for binary reading, refusing anything but a regular file (opened non-blocking, so a FIFO
    swapped in after a check cannot hang the open, then checked with fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot open {what} ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: {what} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _raw_lines(f: BinaryIO, path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without the newline, whether the line ended with a newline), one line at a time; a line
    longer than MAX_LINE_BYTES is a UserError (a binary or foreign file), so memory stays bounded."""
    lineno = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        complete = raw.endswith(b"\n")
        if len(raw) > MAX_LINE_BYTES:
            raise UserError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB; not a predictions file")
        yield lineno, raw[:-1] if complete else raw, complete


def parse_line(raw: str | bytes, path: Path, lineno: int, hint: str = "") -> dict[str, Any]:
    """One line of a predictions file as a dict; a UserError naming file and line otherwise (bad UTF-8, malformed
    JSON, not an object, a lone surrogate such as "\\ud800")."""
    if isinstance(raw, bytes):
        raw = decode_line(raw, path, lineno)
    try:
        rec = json.loads(raw)
    except RecursionError:
        raise UserError(f"{path}:{lineno}: malformed prediction line (nested too deeply){hint}") from None
    except ValueError as e:
        raise UserError(f"{path}:{lineno}: malformed prediction line ({e}){hint}") from None
    if not isinstance(rec, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}{hint}")
    check_json_text(rec, f"{path}:{lineno}")
    return rec


# ----------------------------------------------------------------------------------------------------------------
# is an existing file ours?

_NOT_OURS = "not a predictions file written by flythinker generate"
_REFUSE = "refusing to resume into it (nothing was changed); use another output file"


def _parse_ours(raw: bytes, path: Path, lineno: int) -> dict[str, Any]:
    """A complete line of a file being resumed, as a dict; anything that is not a JSON object is not ours."""
    text = decode_line(raw, path, lineno)
    try:
        rec = json.loads(text)
    except RecursionError:
        rec, why = None, "malformed line: nested too deeply"
    except ValueError as e:
        rec, why = None, f"malformed line: {e}"
    else:
        why = f"a JSON {type(rec).__name__}, not an object"
    if not isinstance(rec, dict):
        raise UserError(f"{path}:{lineno}: {_NOT_OURS} ({why}); {_REFUSE}")
    check_json_text(rec, f"{path}:{lineno}")
    return rec


def _record_problem(rec: dict[str, Any]) -> str | None:
    """Why `rec` is not a line `generate_predictions` writes, or None."""
    unknown = [k for k in rec if k not in RECORD_FIELDS]
    if unknown:
        return f"unexpected field {unknown[0]!r}"
    missing = [k for k in WRITTEN_FIELDS if k not in rec]
    if missing:
        return f"missing field {missing[0]!r}"
    if not isinstance(rec["id"], str):
        return f"'id' is {type(rec['id']).__name__}, not a string"
    if not isinstance(rec["prediction"], str):
        return f"'prediction' is {type(rec['prediction']).__name__}, not a string"
    if rec["reference"] is not None and not isinstance(rec["reference"], str):
        return f"'reference' is {type(rec['reference']).__name__}, not a string"
    if "run" in rec and not isinstance(rec["run"], dict):
        return f"'run' is {type(rec['run']).__name__}, not an object"
    if "extra" in rec and not isinstance(rec["extra"], dict):
        return f"'extra' is {type(rec['extra']).__name__}, not an object"
    return None


_RUN_PARTS = {"checkpoint": "the checkpoint", "data": "the data or prompt settings", "decode": "the decode settings"}


def _run_mismatch(found: Any, run: dict[str, Any]) -> str | None:
    """What differs between a line's `run` and this run's, in words, or None when they agree."""
    if found == run:
        return None
    if not isinstance(found, dict):
        return "it has no 'run' fingerprint (written by hand, by an older flythinker or by the experiments), so it " \
               "cannot be checked against this run"
    keys = [k for k in _RUN_PARTS if k in found or k in run] + sorted((set(found) | set(run)) - set(_RUN_PARTS))
    parts = [f"{_RUN_PARTS.get(k, repr(k))} changed (file {found.get(k)!s:.16}, now {run.get(k)!s:.16})"
             for k in keys if found.get(k) != run.get(k)]
    return "it was written by another run: " + "; ".join(parts)


def _check_record(rec: dict[str, Any], path: Path, lineno: int, method: str | None,
                  run: dict[str, Any] | None) -> None:
    problem = _record_problem(rec)
    if problem is not None:
        raise UserError(f"{path}:{lineno}: {_NOT_OURS} ({problem}); {_REFUSE}")
    if method is not None and rec.get("method") != method:
        raise UserError(f"{path} holds predictions of method {str(rec.get('method'))!r}, not {method!r} (line "
                        f"{lineno}); use another --out or the same --method-name")
    if run is not None:
        why = _run_mismatch(rec.get("run"), run)
        if why is not None:
            raise UserError(f"{path}:{lineno}: {why}; resume only with the same checkpoint, data and decode "
                            f"settings, or use another --out")


def _is_record_prefix(tail: str) -> bool:
    """Whether `tail` (a last line without its newline, and not complete JSON) can be the start of a line this
    writer emits: `{"id": ..., "user_id": ...` with the keys in the writer's order and its separators. A line of
    someone else's file (a dataset starting `{"id": "x", "input": ...`, notes, a JSON array) is not."""
    opening = '{"id": '
    if len(tail) <= len(opening):
        return opening.startswith(tail)
    if not tail.startswith("{"):
        return False
    decoder = json.JSONDecoder()
    optional = {"method", "input", "extra", "run"}
    pos, k, first = 1, 0, True
    while True:
        rest = tail[pos:]
        if not rest:
            return True
        if not first:
            if ", ".startswith(rest):
                return True
            if not rest.startswith(", "):
                return False
            pos += 2
            rest = tail[pos:]
            if not rest:
                return True
        first = False
        allowed = []
        for key in RECORD_FIELDS[k:]:  # the next key: any optional ones, up to the next required one
            allowed.append(key)
            if key not in optional:
                break
        for key in allowed:
            token = f'"{key}": '
            if token.startswith(rest):
                return True  # torn inside the key
            if rest.startswith(token):
                k = RECORD_FIELDS.index(key) + 1
                pos += len(token)
                break
        else:
            return False
        if pos == len(tail):
            return True
        if key == "id" and tail[pos] != '"':
            return False
        try:
            _, pos = decoder.raw_decode(tail, pos)
        except (ValueError, RecursionError):
            return tail[pos] in '"{[-0123456789tfn'  # a value torn part-way
        if k >= len(RECORD_FIELDS):
            return tail[pos:] == ""


def _decode_tail(raw: bytes, path: Path, lineno: int) -> str:
    """A torn last line as text: a multi-byte character cut by the kill at its very end is dropped; a bad byte
    before that is a UserError naming file and line."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
    except UnicodeDecodeError:
        decode_line(raw, path, lineno)  # raises with the byte and column
        raise


def _check_parents(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory (else mkdir would fail with a traceback)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{path}: {parent} is not a directory")
            return


def check_output_target(out_path: str | Path, what: str = "--out") -> Path:
    """`out_path` as a predictions output: its nearest existing folder is a folder, and it is absent or a regular
    file (never a device, pipe or directory: see safeio.check_output_file). Opens nothing."""
    path = Path(out_path)
    _check_parents(path)
    return check_output_file(path, what)


def scan_predictions(out_path: str | Path, method: str | None = None,
                     run: dict[str, Any] | None = None) -> ResumeScan:
    """Check an existing predictions file for resuming, changing nothing: every complete line must be a record of
    this writer (its fields; `method` and `run` equal to these when given; no id twice), and a last line without
    its newline must be the start of such a record (a torn write). Streams the file; a missing file is an empty
    scan. Raises UserError naming file and line for anything else."""
    path = check_output_target(out_path)
    if not path.exists():
        return ResumeScan(path)
    scan = ResumeScan(path)
    seen: set[str] = set()
    with _open_regular(path, "predictions file") as f:
        for lineno, raw, complete in _raw_lines(f, path):
            where = f"{path}:{lineno}"
            if not complete:
                tail = _decode_tail(raw, path, lineno)
                try:
                    rec = json.loads(tail)
                except (ValueError, RecursionError):
                    rec = None
                if isinstance(rec, dict):  # a whole record whose newline was not written yet
                    check_json_text(rec, where)
                    _check_record(rec, path, lineno, method, run)
                elif not _is_record_prefix(tail):
                    raise UserError(f"{where}: {_NOT_OURS} (the last line is neither a record nor the start of "
                                    f"one cut off by a kill); {_REFUSE}")
                scan.size = scan.cut + len(raw)
                break
            if not raw.strip():
                raise UserError(f"{where}: {_NOT_OURS} (an empty line); {_REFUSE}")
            rec = _parse_ours(raw, path, lineno)
            _check_record(rec, path, lineno, method, run)
            i = rec["id"]
            if i in seen:
                raise UserError(f"{where}: duplicate id {i!r} (two writers mixed into this file?); {_REFUSE}")
            seen.add(i)
            scan.ids.append(i)
            scan.cut += len(raw) + 1
            scan.size = scan.cut
    return scan


def check_resume(out_path: str | Path, method: str | None = None, run: dict[str, Any] | None = None) -> ResumeScan:
    """`scan_predictions` under the file's lock: fails fast when another process is writing it, or when it is not
    ours to resume. For callers that want to refuse before an expensive step (loading a model); the writer checks
    again under its own lock. Creates nothing but the lock file (`<out>.lock`, only when the folder exists)."""
    path = check_output_target(out_path)
    if not path.parent.is_dir():  # nothing there yet, and nobody can hold a lock in a missing folder
        return ResumeScan(path)
    with exclusive_lock(path, LOCK_WHAT):
        return scan_predictions(path, method=method, run=run)


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def generate_predictions(examples: Sequence[Any], predict_batch_fn: PredictBatchFn, out_path: str | Path,
                         batch_size: int = 8, method: str | None = None, progress: bool = True,
                         run: dict[str, Any] | None = None, skip: Collection[str] = ()) -> GenerateStats:
    """Predict every example not yet in `out_path` and append one JSON line each, flushed per batch.

    examples: objects or dicts with id, user_id, output (the reference) and optionally input.
    predict_batch_fn: list of examples -> one prediction per example, in order: a string, or {"text", "extra"}.
    method: stored in every line (the name `flythinker evaluate` reports); must match a resumed file's.
    run: fingerprints of what produced the predictions (JSON-able dict), stored in every line; a resumed file's
        lines must carry the same (see the module doc). None: not recorded and not checked.
    skip: ids already written elsewhere (the merged file of a data-parallel run, see `shard_path`): neither
        predicted nor written here, counted as skipped.
    Re-running after a kill (or a crash inside predict_batch_fn) skips what was written and loses nothing. The
    existing file is checked whole before anything is changed (`scan_predictions`), under an exclusive lock held
    until the last line is written."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1; got {batch_size}")
    ids = [str(_field(ex, "id")) for ex in examples]
    if len(set(ids)) != len(ids):
        counts: dict[str, int] = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        dup = next(i for i in ids if counts[i] > 1)
        raise UserError(f"example id {dup!r} occurs more than once; resumable generation needs unique ids")
    out_path = check_output_target(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_path}: cannot create its directory ({e.strerror})") from None
    from tqdm.auto import tqdm

    with exclusive_lock(out_path, LOCK_WHAT):
        scan = scan_predictions(out_path, method=method, run=run)
        if scan.torn:  # only now, with the whole file checked: drop the torn last line of our own
            _truncate(out_path, scan.cut)
        done = set(scan.ids) | {str(i) for i in skip}
        skipped = sum(i in done for i in ids)
        written = 0
        bar = tqdm(total=len(ids), initial=skipped, disable=not progress, desc=method or "generate", unit="ex")
        try:
            with open(out_path, "ab") as f:
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
                        extra = None
                        if isinstance(pred, dict):  # {"text": ..., "extra": {...}}: a method's side outputs
                            pred, extra = pred.get("text"), pred.get("extra")
                        rec["prediction"] = pred
                        rec["reference"] = _field(ex, "output")
                        if _field(ex, "input") is not None:
                            rec["input"] = _field(ex, "input")  # the instruction, for the LLM judge's rubric
                        if extra:
                            rec["extra"] = extra  # e.g. CoT's reasoning text; never scored
                        if run is not None:
                            rec["run"] = run
                        where = f"the prediction for example {rec['id']!r}"
                        problem = _record_problem(rec)  # what the next resume's scan would refuse
                        if problem is not None:
                            raise UserError(f"{where}: cannot be written ({problem})")
                        check_json_text(rec, where)
                        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                    # One write per batch, then flush + fsync: a kill loses at most this batch, and leaves at most
                    # one torn line, which the next run drops.
                    f.write("".join(lines).encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
                    written += len(todo)
                    bar.update(len(todo))
        finally:
            bar.close()
    return GenerateStats(total=len(ids), skipped=skipped, written=written, repaired=scan.torn, out_path=out_path)


# ----------------------------------------------------------------------------------------------------------------
# data-parallel generation: one shard file per process, merged into the one predictions file

_SHARD_RE = re.compile(r"\.shard-(\d+)-of-(\d+)\.jsonl$")


def shard_path(out_path: str | Path, rank: int, world: int) -> Path:
    """The file process `rank` of `world` writes in a data-parallel run: `<out>.shard-<rank>-of-<world>.jsonl`."""
    out = Path(out_path)
    return out.with_name(f"{out.name}.shard-{rank}-of-{world}.jsonl")


def shard_files(out_path: str | Path) -> list[tuple[int, int, Path]]:
    """The shard files of `out_path` that exist, as (rank, world, path), sorted."""
    out = Path(out_path)
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        if p.name.startswith(f"{out.name}.shard-") and (m := _SHARD_RE.search(p.name[len(out.name):])):
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


def shard_examples(examples: Sequence[Any], batch_size: int, rank: int, world: int) -> list[Any]:
    """Process `rank`'s share of `examples`: the chunks k (examples[k*B:(k+1)*B], B = batch_size) with
    k % world == rank, in order. Whole chunks, so each batch decoded (its rows, their padding, its chunk seed) is
    the one a single process decodes."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}); got {rank}")
    return [ex for k in range(rank, math.ceil(len(examples) / batch_size), world)
            for ex in examples[k * batch_size:(k + 1) * batch_size]]


def _complete_lines(path: Path, method: str | None, run: dict[str, Any] | None) -> list[tuple[str, bytes]]:
    """(id, line with its newline) of every complete record of a predictions file, checked like a resume
    (`scan_predictions`); a torn last line is left out."""
    scan = scan_predictions(path, method=method, run=run)
    with _open_regular(path, "predictions file") as f:
        lines = [raw + b"\n" for _, raw, complete in _raw_lines(f, path) if complete]
    return list(zip(scan.ids, lines[:len(scan.ids)]))


def merge_shards(out_path: str | Path, ids: Sequence[str], world: int, method: str | None = None,
                 run: dict[str, Any] | None = None) -> int:
    """Merge the `world` shard files of a finished data-parallel run and what `out_path` already holds into
    `out_path`: the records of `ids` in that order, then any other records --out held (another --limit), in its
    order. Written atomically under the file's lock, then the shard files are removed. Every record is checked as
    a resume would (method, run); a missing shard or an id of `ids` found nowhere is a UserError (a process did
    not finish), and nothing is changed then. Returns the number of records written."""
    out = check_output_target(out_path)
    with exclusive_lock(out, LOCK_WHAT):
        shards = [shard_path(out, r, world) for r in range(world)]
        absent = [p for p in shards if not p.exists()]
        if absent:
            raise UserError(f"{absent[0]}: missing; a process of this {world}-process run did not write its shard")
        records: dict[str, bytes] = {}
        for src in ([out] if out.exists() else []) + shards:
            for i, line in _complete_lines(src, method, run):
                records.setdefault(i, line)
        missing = [i for i in map(str, ids) if i not in records]
        if missing:
            raise UserError(f"{out}: example {missing[0]!r} is in no shard ({len(missing)} missing); a process of "
                            f"this {world}-process run did not finish: run the same command again")
        wanted = set(map(str, ids))
        body = b"".join([records[str(i)] for i in ids] + [line for i, line in records.items() if i not in wanted])
        atomic_write_text(out, body.decode("utf-8"))
        for p in shards:
            p.unlink()
            p.with_name(p.name + ".lock").unlink(missing_ok=True)  # its writer's lock; that writer has finished
    return len(records)


# ----------------------------------------------------------------------------------------------------------------
# the reader


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
    """Read one prediction file written by `flythinker generate` (or by hand: id, prediction, reference per line;
    other fields such as `run` are ignored). Streams the file line by line.

    Raises UserError naming the file and line for a non-UTF-8 byte, a lone surrogate, a malformed line, a missing
    field, a non-string prediction or a duplicate id; and for a missing or non-regular file."""
    path = Path(path)
    ids: list[str] = []
    user_ids, preds, refs, inputs = [], [], [], []
    methods: set[str] = set()
    seen: set[str] = set()
    with _open_regular(path, "prediction file") as f:
        for lineno, raw, _ in _raw_lines(f, path):
            if not raw.strip():
                continue
            rec = parse_line(raw, path, lineno)
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


__all__ = [
    "RECORD_FIELDS",
    "REQUIRED_FIELDS",
    "GenerateStats",
    "PredictBatchFn",
    "PredictionSet",
    "ResumeScan",
    "check_output_target",
    "check_resume",
    "generate_predictions",
    "merge_shards",
    "parse_line",
    "read_predictions",
    "scan_predictions",
    "shard_examples",
    "shard_files",
    "shard_path",
]
