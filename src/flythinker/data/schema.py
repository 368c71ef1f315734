"""The one record type (`Example`) and `load_examples`, which reads every supported source into it.

Owns: the task names, the readers (generic JSONL / .jsonl.gz, LongLaMP json / jsonl / jsonl.gz / parquet files and
directories laid out like the Hugging Face `LongLaMP/LongLaMP` configs, in-memory `datasets` objects, and the hub
through `datasets.load_dataset`), record validation with one-line `UserError`s (file + line, field + record id),
task detection, stable derived ids, newest-first profile ordering, and the per-item field accessors.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..safeio import check_json_text, decode_line, special_kind
from ..utils import UserError

TASKS: tuple[str, ...] = ("product_review", "abstract_generation", "topic_writing", "generic")
"""LongLaMP's three long-form tasks plus "generic" (own data in the generic schema: whole input as the query)."""
SETTINGS: tuple[str, ...] = ("user", "temporal")
LONGLAMP_REPO = "LongLaMP/LongLaMP"

# Where a record keeps its author: the generic schema says user_id; LongLaMP configs use per-task names.
USER_ID_KEYS = ("user_id", "userId", "reviewerId", "reviewerID", "author", "name", "user")
# Per-item text and title fields, most specific first: generic {title, text}, reviews {summary, reviewText},
# abstracts {title, abstract}, topics {summary, content} or {input, output}.
TEXT_KEYS = ("text", "reviewText", "abstract", "content", "output")
TITLE_KEYS = ("title", "summary", "input")
DATE_KEYS = ("date", "year", "unixReviewTime", "timestamp", "time")
DATA_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")
SPLIT_ALIASES = {"dev": "val", "validation": "val", "valid": "val"}

# A LongLaMP config name as a whole folder name, or at the start of a file name ("product_review_user-train.json").
_CONFIG_DIR_RE = re.compile(r"(product_review|abstract_generation|topic_writing)_(?:user|temporal)")
_CONFIG_FILE_RE = re.compile(r"(product_review|abstract_generation|topic_writing)_(?:user|temporal)(?:[-_.].*)?")
_HUB_RE = re.compile(r"^(?:(?P<repo>[\w.-]+/[\w.-]+):)?(?P<config>(?:product_review|abstract_generation|topic_writing)"
                     r"_(?:user|temporal))(?::(?P<split>[\w-]+))?$")


@dataclass
class Example:
    """One personalised example: a user's history, a query and that user's response.

    profile: the same user's earlier items as dicts (kept as read; "text"/"title" or the LongLaMP field names),
        newest first where every item carries a date.
    task: which prompt template and query extraction apply (one of TASKS); set by `load_examples`.
    """

    id: str
    user_id: str
    input: str
    output: str
    profile: list[dict[str, Any]] = field(default_factory=list)
    task: str = "generic"


# ----------------------------------------------------------------------------------------------------------------
# item accessors (shared by retrieval and prompts so both read the same fields)


def _first(item: dict[str, Any], keys: Iterable[str]) -> str:
    for k in keys:
        v = item.get(k)
        if v is not None and str(v).strip():
            return str(v)
    return ""


def item_text(item: dict[str, Any]) -> str:
    """The body of a profile item (the user's own writing)."""
    return _first(item, TEXT_KEYS)


def item_title(item: dict[str, Any]) -> str:
    """The title/summary of a profile item, "" when it has none."""
    return _first(item, TITLE_KEYS)


def check_task(task: str | None) -> str | None:
    """Validate a task name (None / "auto" = detect). Raises UserError listing the valid names."""
    if task is None or task == "auto":
        return None
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; valid: auto, {', '.join(TASKS)}")
    return task


# ----------------------------------------------------------------------------------------------------------------
# readers: each yields (where, record) so errors can name the file and line


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _read_json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = decode_line(raw, path, lineno)  # a non-UTF-8 byte: file and line, not a codec traceback
                if not line.strip():
                    continue
                try:
                    yield f"{path} line {lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A .json file: one JSON array of records, or (as the HF json loader also accepts) JSON lines."""
    try:
        with _open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":          # several top-level values: it is JSON lines under a .json name
            yield from _read_json_lines(path)
            return
        raise UserError(f"{path} line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict):
        # A single record, or a wrapper holding the list (e.g. {"data": [...]}).
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if "input" in data or len(lists) != 1:
            data = [data]
        else:
            data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"{path} record {i}", rec


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    for i, rec in enumerate(rows):
        yield f"{path} row {i}", rec


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _read_parquet(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_json_lines(path)
    if name.endswith((".json", ".json.gz")):
        return _read_json(path)
    raise UserError(f"{path}: unsupported file type; expected one of {', '.join(DATA_SUFFIXES)}")


def _split_of(path: Path, root: Path) -> str:
    """The split a data file belongs to: its name up to the first '-' or '.' (HF shards look like
    `train-00000-of-00001.parquet`), or its folder name when the file name is not a split name."""
    stem = re.split(r"[-.]", path.name, maxsplit=1)[0]
    if stem in ("train", "val", "test", "dev", "validation", "valid"):
        return stem
    parent = path.parent
    return parent.name if parent != root else stem


def _directory_files(root: Path, split: str | None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES))
    if not files:
        raise UserError(f"{root}: no data files ({', '.join(DATA_SUFFIXES)}) in this directory")
    groups: dict[str, list[Path]] = {}
    for p in files:
        rel_parent = p.parent.relative_to(root)
        key = str(rel_parent / _split_of(p, root)) if rel_parent != Path(".") else _split_of(p, root)
        groups.setdefault(key, []).append(p)
    if split is not None:
        canon = SPLIT_ALIASES.get(split, split)
        chosen = {k: v for k, v in groups.items() if SPLIT_ALIASES.get(Path(k).name, Path(k).name) == canon}
        if not chosen:
            raise UserError(f"{root}: no files for split {split!r}; found: {', '.join(sorted(groups))}")
    else:
        chosen = groups
    if len(chosen) > 1:
        raise UserError(f"{root}: holds several splits/configs ({', '.join(sorted(chosen))}); pass a file, a "
                        f"narrower directory, or a split (PATH:SPLIT or split=...)")
    return next(iter(chosen.values()))


def _records_from_dataset(obj: Any, split: str | None, where: str) -> Iterator[tuple[str, Any]]:
    """A `datasets.Dataset` / `DatasetDict` (or any list of dicts / mapping split -> rows)."""
    if isinstance(obj, dict) and "input" not in obj:        # DatasetDict is a dict subclass
        names = list(obj)
        key = split if split in obj else SPLIT_ALIASES.get(split or "")
        if key is None or key not in obj:
            if split is None and len(names) == 1:
                key = names[0]
            else:
                raise UserError(f"{where}: choose a split with split=...; available: {', '.join(map(str, names))}")
        obj = obj[key]
        where = f"{where}[{key}]"
    for i, rec in enumerate(obj):
        yield f"{where} row {i}", rec


def _load_hub(repo: str, config: str, split: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError("loading from the Hugging Face hub needs `datasets` (pip install flythinker[data])") from None
    if split is None:
        raise UserError(f"{repo}:{config}: give a split, e.g. {config}:train (LongLaMP splits: train, val, test)")
    hub_split = SPLIT_ALIASES.get(split, split) if repo == LONGLAMP_REPO else split
    try:
        ds = datasets.load_dataset(repo, name=config, split=hub_split)
    except Exception as e:  # network, auth, unknown config/split: all are the user's to fix
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"could not load {repo}:{config}:{hub_split} ({type(e).__name__}: {msg})") from None
    return _records_from_dataset(ds, None, f"{repo}:{config}:{hub_split}")


# ----------------------------------------------------------------------------------------------------------------
# record -> Example


def _clean(obj: Any) -> Any:
    """Drop None values that parquet/HF struct columns insert for fields an item lacks."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _hash(*parts: Any, n: int = 12) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:n]


def _timestamp(value: Any) -> float | None:
    """A sortable time for a date-like value (ISO string, year, unix seconds), or None when unparseable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        v = float(value)
        return datetime(int(v), 1, 1, tzinfo=timezone.utc).timestamp() if 0 < v < 3000 else v
    if isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"\d{4}", s):
            return datetime(int(s), 1, 1, tzinfo=timezone.utc).timestamp()
        try:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            return None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)      # naive dates compare as UTC
        return dt.timestamp()
    return None


def newest_first(profile: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stable sort newest first when every item has a parseable date; otherwise the stored order is kept
    (a partial sort would interleave dated and undated items arbitrarily)."""
    stamps = []
    for item in profile:
        t = next((_timestamp(item[k]) for k in DATE_KEYS if k in item), None)
        if t is None:
            return list(profile)
        stamps.append(t)
    order = sorted(range(len(profile)), key=lambda i: -stamps[i])   # sorted() is stable: ties keep file order
    return [profile[i] for i in order]


def detect_task(records: list[dict[str, Any]], source: str = "") -> str:
    """The task from a LongLaMP config name in the path (a folder named like `product_review_user`, or a file
    name starting with one), else from the profile items' field names."""
    if source:
        parts = Path(source).parts
        for i, part in enumerate(reversed(parts)):
            m = (_CONFIG_FILE_RE if i == 0 else _CONFIG_DIR_RE).fullmatch(part)
            if m:
                return m.group(1)
    for rec in records:
        profile = rec.get("profile") if isinstance(rec, dict) else None
        for item in profile or []:
            if not isinstance(item, dict):
                continue
            if "reviewText" in item:
                return "product_review"
            if "abstract" in item:
                return "abstract_generation"
            if "content" in item or ("output" in item and "text" not in item):   # topic items: both shapes
                return "topic_writing"
            return "generic"
    return "generic"


def _to_example(rec: Any, where: str, task: str, require_output: bool) -> Example:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    rec = _clean(rec)
    rid = str(rec["id"]) if "id" in rec else None
    label = f"{where} (id {rid})" if rid is not None else where
    check_json_text(rec, label)  # a lone "\ud800" escape is valid JSON but no tokenizer or file can take it
    required = ("input", "output", "profile") if require_output else ("input", "profile")
    for key in required:
        if key not in rec:
            raise UserError(f"{label}: missing required field {key!r}")
    for key in ("input", "output"):
        if key in rec and not isinstance(rec[key], str):
            raise UserError(f"{label}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    profile = rec["profile"]
    if not isinstance(profile, list):
        raise UserError(f"{label}: field 'profile' must be a list, got {type(profile).__name__}")
    for j, item in enumerate(profile):
        if not isinstance(item, dict):
            raise UserError(f"{label}: profile[{j}] must be an object, got {type(item).__name__}")
        if not any(k in item for k in TEXT_KEYS):
            raise UserError(f"{label}: profile[{j}] is missing its text (one of {', '.join(TEXT_KEYS)})")
    user = next((str(rec[k]) for k in USER_ID_KEYS if k in rec and str(rec[k]).strip()), None)
    if user is None:
        # No author field (some LongLaMP dumps): the profile is the user's history, so hash it (stable).
        user = "u-" + _hash(profile)
    output = rec.get("output", "")
    if rid is None:
        rid = _hash(user, rec["input"], output)
    return Example(id=rid, user_id=user, input=rec["input"], output=output,
                   profile=newest_first([dict(it) for it in profile]), task=task)


def _resolve_source(path_or_name: Any, split: str | None) -> tuple[Iterator[tuple[str, Any]], str]:
    """(records with locations, a string describing the source for task detection)."""
    if not isinstance(path_or_name, (str, Path)):
        return _records_from_dataset(path_or_name, split, type(path_or_name).__name__), ""
    text = str(path_or_name)
    p = Path(text).expanduser()
    if not p.exists() and ":" in text:
        base, _, suffix = text.rpartition(":")          # "DIR:SPLIT" / "FILE:SPLIT" shorthand
        if Path(base).expanduser().exists() and re.fullmatch(r"[\w-]+", suffix):
            p, split = Path(base).expanduser(), split or suffix
    if p.exists() and not (p.is_file() or p.is_dir()):
        raise UserError(f"{p}: is {special_kind(p)}; datasets are read from regular files (or a directory of them)")
    if p.is_file():
        return _read_file(p), str(p)
    if p.is_dir():
        files = _directory_files(p, split)
        return (rec for f in files for rec in _read_file(f)), str(files[0])
    m = _HUB_RE.match(text)
    if m:
        repo, config = m.group("repo") or LONGLAMP_REPO, m.group("config")
        return _load_hub(repo, config, split or m.group("split")), config
    raise UserError(f"{text}: not found (expected a file, a directory, or a LongLaMP config such as "
                    f"product_review_user:train)")


def load_examples(path_or_name: Any, task: str | None = None, split: str | None = None,
                  require_output: bool = True) -> list[Example]:
    """Read personalised examples from any supported source.

    Args:
        path_or_name: a file (.jsonl, .jsonl.gz, .json, .json.gz, .parquet); a directory (one split/config of
            files, e.g. HF shards; "DIR:SPLIT" picks a split); a LongLaMP config "[REPO:]CONFIG[:SPLIT]" such as
            "product_review_user:train" (loaded with `datasets.load_dataset`); or an in-memory
            `datasets.Dataset`/`DatasetDict` or list of dicts.
        task: one of TASKS, or None/"auto" to detect it from the path (LongLaMP config names) or the fields.
        split: the split for directories, DatasetDicts and the hub ("dev"/"validation" also match "val").
        require_output: False for unlabelled data to generate on (missing "output" becomes "").

    Returns: examples in source order. Raises UserError (one line) on any bad input.
    """
    task = check_task(task)
    records, source = _resolve_source(path_or_name, split)
    rows = list(records)
    if task is None:
        task = detect_task([r for _, r in rows[:50]], source)
    examples = []
    seen: dict[str, int] = {}
    for where, rec in rows:
        ex = _to_example(rec, where, task, require_output)
        if not (isinstance(rec, dict) and "id" in rec):
            # Derived ids of identical records would collide; given ids are kept exactly as written.
            n = seen.get(ex.id, 0)
            seen[ex.id] = n + 1
            if n:
                ex.id = f"{ex.id}-{n + 1}"
        examples.append(ex)
    return examples


__all__ = ["Example", "TASKS", "SETTINGS", "check_task", "detect_task", "item_text", "item_title",
           "load_examples", "newest_first"]
