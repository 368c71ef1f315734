"""Timing shared by the benchmarks and the experiments: one timed generation (`time_generation`), interleaved
timing of several configurations (`time_configs`), and the median optimizer-step time of a trainer log."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model, ids: torch.Tensor, new_tokens: int,
                    kw: dict[str, Any] | None = None) -> tuple[float, list[float]]:
    """One timed generation of an unpadded batch `ids` (B, T): (prefill ms = prompt in -> first token out, ms of
    each later decode step). EOS is disabled so every run decodes `new_tokens` tokens; exactly one generation is
    inside the timed window. `kw` goes to the decode loop's `stream` (backend, thread split). The one timing
    primitive of the project: `bench decode` and the experiments' efficiency figures both use it."""
    from ..decoding.loop import stream

    kw = kw or {}
    mask = torch.ones_like(ids)
    _sync(ids.device)
    t0 = time.perf_counter()
    it = stream(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=[], **kw)
    next(it)
    _sync(ids.device)
    marks = [time.perf_counter()]
    for _ in it:
        _sync(ids.device)
        marks.append(time.perf_counter())
    return (marks[0] - t0) * 1e3, [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def time_configs(configs: list[tuple[Any, int | None, dict[str, Any]]], ids: torch.Tensor | Sequence[torch.Tensor],
                 new_tokens: int, runs: int) -> list[tuple[float, float]]:
    """(median prefill ms over runs, median ms of one decode step over all steps of all runs) per configuration
    (model, main-thread count, decode kwargs). `ids` is one prompt batch for all, or one per configuration.

    Robust to a shared machine: runs are interleaved (run 1 of every configuration, then run 2, ...) so background
    load hits all configurations alike, and the per-token figure is the median over every decode step rather than
    a per-run mean, so a burst of contention that stalls a few steps does not move it. Each configuration first
    decodes a short warm-up (allocator, OpenMP teams, the Reasoner's worker thread)."""
    from ..decoding.concurrency import pinned_threads

    per = list(ids) if not isinstance(ids, torch.Tensor) else [ids] * len(configs)
    if len(per) != len(configs):
        raise ValueError(f"{len(per)} prompt batches for {len(configs)} configurations")
    for (model, threads, kw), x in zip(configs, per):
        with pinned_threads(threads):
            time_generation(model, x[:, -min(x.shape[1], 16):], 3, kw)
    prefill: list[list[float]] = [[] for _ in configs]
    steps: list[list[float]] = [[] for _ in configs]
    for _ in range(runs):
        for i, (model, threads, kw) in enumerate(configs):
            with pinned_threads(threads):
                pre, dec = time_generation(model, per[i], new_tokens, kw)
            prefill[i].append(pre)
            steps[i].extend(dec)
    return [(statistics.median(p), statistics.median(d)) for p, d in zip(prefill, steps)]


def median_step_seconds(log_path: Path) -> float | None:
    """Median of the per-step `seconds` in a trainer log.jsonl, skipping step 1 (one-off allocations); None when
    the log is missing or has fewer than two steps."""
    if not log_path.is_file():
        return None
    secs = [r["seconds"] for r in map(json.loads, log_path.read_text().splitlines()) if r.get("step", 0) > 1
            and "seconds" in r]
    return statistics.median(secs) if secs else None
