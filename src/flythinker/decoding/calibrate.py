"""Choosing a two-call decode's backend by measurement: what "auto" does on one CPU device with >= 2 threads.

Owns the candidates (`candidates`: sequential with every thread, "threads" with the cost-based split and one or two
other splits, "process" at the cost-based split where the decode allows it), the timing (`measure`: a few interleaved
decode steps of each candidate on the actual models at the actual batch size; the step timer is injectable), the cache
(`cache_path`: one JSON under the flythinker cache, keyed by machine, model pair, batch size and candidates, written
atomically under a lock, re-measured after `TTL_S`) and the switch ($FLYTHINKER_DECODE_CALIBRATE=0: the fixed rule of
`concurrency.resolve_backend`). The stepper that asks is the method's (`methods.flythinker.decode`); this module only
sees a probe it is handed. Why CUDA and two-device placements keep the fixed rule: docs/decode_backends.md.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .concurrency import split_threads

log = logging.getLogger("flythinker.decoding")

ENV = "FLYTHINKER_DECODE_CALIBRATE"
"""0 / false / off: never measure ("auto" follows the fixed rule). Anything else, or unset: measure."""
CACHE_NAME = "decode_calibration.json"
VERSION = 1  # bump when what is measured changes, so old entries are not reused
TTL_S = 24 * 3600.0
"""An entry older than this is measured again: a machine's load changes (a measurement taken while another job held
a core favours other choices than an idle machine), and a second or two a day is cheap next to decoding."""
ROUNDS = 3
"""Rounds of the interleaved measurement: each round runs one block of every candidate, so drift hits them alike."""
BLOCK = 3
"""Consecutive steps of one candidate per round; the first of a block is not timed (it pays the switch-over: the
caller's thread count, the worker's wake-up), so a block times what a decode in that backend pays per step."""
MAX_ENTRIES = 64

StepTimer = Callable[["Candidate", Callable[[], None]], float]


def enabled() -> bool:
    """Whether "auto" may measure ($FLYTHINKER_DECODE_CALIBRATE, on unless 0 / false / no / off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_path() -> Path:
    """The calibration cache: decode_calibration.json in the flythinker cache ($FLYTHINKER_CACHE, else
    ~/.cache/flythinker; `default_model.cache_root`)."""
    from ..default_model import cache_root

    return cache_root() / CACHE_NAME


@dataclass(frozen=True)
class Candidate:
    """One way to run the two calls: "sequential" (every thread, one call after the other), or "threads" / "process"
    with cpu_threads = (main, side) intra-op threads."""

    backend: str
    cpu_threads: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        return self.backend if self.cpu_threads is None else f"{self.backend} {self.cpu_threads[0]}+{self.cpu_threads[1]}"


@dataclass
class Choice:
    """What "auto" runs: the backend and its split, where the answer came from ("measured" or "cache"), the median
    ms per step of every candidate, and the cache key."""

    backend: str
    cpu_threads: tuple[int, int] | None
    source: str
    ms: dict[str, float] = field(default_factory=dict)
    key: str = ""

    @property
    def label(self) -> str:
        return Candidate(self.backend, self.cpu_threads).label


def candidates(costs: tuple[int, int], total: int, split: tuple[int, int] | None = None,
               remote: bool = True) -> list[Candidate]:
    """sequential, then "threads" with the cost-based split of `total` threads (`concurrency.split_threads` on the
    two calls' multiply-adds `costs`), one thread for the side call, and an even split: distinct, each side >= 1;
    then, with `remote`, "process" (the side call in a worker process) at the cost-based split. `split` (the
    caller's own cpu_threads) replaces the splits. With total < 2 only sequential remains."""
    out = [Candidate("sequential")]
    if total < 2:
        return out
    splits = [split] if split is not None else [split_threads(*costs, total), (total - 1, 1),
                                                (total - total // 2, total // 2)]
    for s in splits:
        c = Candidate("threads", (int(s[0]), int(s[1])))
        if c not in out and min(c.cpu_threads) >= 1:
            out.append(c)
    if remote:
        out.append(Candidate("process", (int(splits[0][0]), int(splits[0][1]))))
    return out


def perf_step_time(candidate: Candidate, step: Callable[[], None]) -> float:
    """Seconds one decode step takes on the wall clock (CPU only: nothing to synchronise)."""
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def measure(step: Callable[[Candidate], None], cands: Sequence[Candidate], time_step: StepTimer | None = None,
            rounds: int = ROUNDS, block: int = BLOCK) -> dict[str, float]:
    """Median ms per step of each candidate. `step(candidate)` runs one step of the probe decode with that
    candidate's backend; `time_step(candidate, fn)` returns the seconds `fn` (one such step) took (default
    `perf_step_time`; tests inject a fake). Round-robin: `rounds` rounds of one `block` per candidate, its first
    step untimed. Runs rounds * block * len(cands) steps."""
    timer = time_step or perf_step_time
    times: dict[str, list[float]] = {c.label: [] for c in cands}
    for _ in range(rounds):
        for c in cands:
            for i in range(block):
                if i == 0 and block > 1:
                    step(c)
                    continue
                times[c.label].append(timer(c, lambda c=c: step(c)))
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def probe_steps(n_candidates: int, rounds: int = ROUNDS, block: int = BLOCK) -> int:
    """Decode steps `measure` runs for `n_candidates` (the probe's room)."""
    return rounds * block * n_candidates


def machine_key(threads: int) -> dict[str, Any]:
    """What identifies this machine for a measurement: CPU model, cores this process may use, the thread budget,
    torch's version."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"cpu": _cpu_model(), "cores": cores, "threads": int(threads), "torch": torch.__version__}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def model_key(lms: Sequence[Any], extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A cheap fingerprint of each model's shape (no weights are read): architecture, widths, layer and head
    counts, vocabulary, dtype; `extra` (e.g. a fusion projection) joins the first."""
    out = []
    for lm in lms:
        cfg = getattr(lm, "config", None)
        p = next(lm.parameters(), None)
        emb = lm.get_input_embeddings()
        row = {"type": getattr(cfg, "model_type", type(lm).__name__), "hidden": emb.embedding_dim,
               "vocab": emb.num_embeddings, "dtype": str(p.dtype) if p is not None else None}
        for name in ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            row[name] = getattr(cfg, name, None)
        out.append(row)
    if extra and out:
        out[0].update(extra)
    return out


def choose(key: dict[str, Any], cands: Sequence[Candidate], open_probe: Callable[[int], tuple[Any, Any]],
           time_step: StepTimer | None = None, path: Path | None = None, ttl: float = TTL_S,
           now: float | None = None) -> Choice:
    """The fastest of `cands` for `key` (machine, models, batch: what the measurement depends on), from the cache
    when a fresh entry is there, else measured now and cached.

    open_probe(steps) -> (step, close): a probe decode with room for `steps` steps, `step(candidate)` running one
    of them with that candidate's backend and `close()` ending it. Ties go to the earlier candidate (sequential
    first: the simpler one). A cache that cannot be read is measured over; one that cannot be written leaves the
    choice uncached (logged), never fails the decode."""
    from ..safeio import fingerprint

    cands = list(cands)
    full = {"version": VERSION, **key, "candidates": [c.label for c in cands]}
    digest = fingerprint(full)
    path = cache_path() if path is None else Path(path)
    now = time.time() if now is None else now
    by_label = {c.label: c for c in cands}
    entry = fresh_entry(path, digest, ttl, now)
    if entry is not None and entry.get("choice") in by_label:
        c = by_label[entry["choice"]]
        return Choice(c.backend, c.cpu_threads, "cache", dict(entry.get("ms") or {}), digest)
    step, close = open_probe(probe_steps(len(cands)))
    try:
        ms = measure(step, cands, time_step)
    finally:
        close()
    best = min(cands, key=lambda c: ms[c.label])  # min keeps the first of equals
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # recorded to explain a surprising choice
    store(path, digest, {"choice": best.label, "ms": {k: round(v, 4) for k, v in ms.items()}, "measured_at": now,
                          "load_before": load, "key": full})
    return Choice(best.backend, best.cpu_threads, "measured", ms, digest)


def fresh_entry(path: Path, digest: str, ttl: float, now: float) -> dict[str, Any] | None:
    """The cache's entry for `digest` when it is a dict measured at most `ttl` seconds before `now`; else None
    (missing, stale, from the future, or unreadable: measured over). The caller checks its own fields."""
    entry = _read(path).get(digest)
    if isinstance(entry, dict) and isinstance(entry.get("measured_at"), (int, float)) \
            and 0 <= now - entry["measured_at"] <= ttl:
        return entry
    return None


def _read(path: Path) -> dict[str, Any]:
    """The cache's entries; {} for a missing, unreadable or foreign file (it is a cache: measured over)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == VERSION else None
    return entries if isinstance(entries, dict) else {}


def store(path: Path, digest: str, entry: dict[str, Any]) -> None:
    """Add one entry under the cache's lock (read again inside it, so two processes' entries both survive),
    keeping the newest MAX_ENTRIES, and replace the file atomically."""
    from ..safeio import atomic_write_text, exclusive_lock
    from ..utils import UserError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path, "decode calibration cache"):
            entries = _read(path)
            entries[digest] = entry
            newest = sorted(entries.items(), key=lambda kv: -float((kv[1] or {}).get("measured_at") or 0))
            text = json.dumps({"version": VERSION, "entries": dict(newest[:MAX_ENTRIES])}, indent=1, sort_keys=True)
            atomic_write_text(path, text + "\n")
            path.chmod(0o644)  # a cache of timings, no secret: readable where $FLYTHINKER_CACHE is shared
    except UserError:  # another process is writing its own measurement right now: ours is simply not cached
        log.info("decode calibration cache %s is locked by another process; this choice is not cached", path)
    except OSError as e:
        log.warning("cannot write the decode calibration cache %s (%s); set $FLYTHINKER_CACHE to a writable "
                    "folder, or %s=0 for the fixed rule", path, e.strerror or e, ENV)


__all__ = [
    "BLOCK",
    "CACHE_NAME",
    "ENV",
    "ROUNDS",
    "TTL_S",
    "Candidate",
    "Choice",
    "cache_path",
    "candidates",
    "choose",
    "enabled",
    "machine_key",
    "measure",
    "model_key",
    "perf_step_time",
    "probe_steps",
]
