"""Choosing a decode's weights dtype by measurement: what a decoding `dtype: auto` runs on a CPU with native bf16.

Owns `choose_decode_dtype`: a few greedy decode steps (KV cache, after a PROMPT_TOKENS prefill) of each model in
fp32 and in bf16, timed in interleaved rounds (`calibrate.measure`; the step timer is injectable), the faster
dtype kept in the decode calibration cache (`calibrate.cache_path`, its own key: machine, models, batch size;
re-measured after `calibrate.TTL_S`). The fixed rule `utils.resolve_dtype("auto")` stays where nothing is measured:
CUDA, a CPU without native bf16, $FLYTHINKER_DECODE_CALIBRATE=0, several processes. An explicit dtype always wins.
Why: on an AVX512-BF16 CPU bf16 decodes faster than fp32 at batch 8 and slower at batch 1 (docs/decode_backends.md).
"""

from __future__ import annotations

import copy
import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import calibrate

VERSION = 1  # bump when what is measured changes, so old entries are not reused
PROMPT_TOKENS = 256
"""Prefill length of the probe: a decode step's attention over the cache is part of what bf16 speeds up or slows
down, so the probe steps at a realistic context rather than an empty one."""
DTYPES = ("float32", "bfloat16")
"""The two sides of the choice, in tie-break order (a tie keeps fp32: exact, and the fixed rule's fallback)."""

SOURCES = ("explicit", "rule", "measured", "cache")


@dataclass(frozen=True)
class DtypeCandidate:
    """One side of the measurement (what `calibrate.measure` and a step timer see: a `label`)."""

    label: str

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.label)


@dataclass
class DtypeChoice:
    """The weights dtype a decode runs in, where it came from (`SOURCES`), the batch size it was chosen for, and
    for "measured" / "cache" the median ms per decode step of each dtype (summed over the models) and the key."""

    dtype: torch.dtype
    source: str
    batch: int
    ms: dict[str, float] = field(default_factory=dict)
    key: str = ""

    @property
    def name(self) -> str:
        from ..utils import dtype_name

        return dtype_name(self.dtype)

    def describe(self) -> str:
        """One line for the logs, e.g. "decode dtype: float32 (measured: 45.1 vs 67.3 ms/step at batch 1)"."""
        if self.source in ("measured", "cache") and len(self.ms) == 2:
            other = next(k for k in self.ms if k != self.name)
            how = "measured" if self.source == "measured" else "cached measurement"
            return (f"decode dtype: {self.name} ({how}: {self.ms[self.name]:.1f} vs {self.ms[other]:.1f} ms/step "
                    f"at batch {self.batch})")
        why = "as set" if self.source == "explicit" else "fixed rule, not measured"
        return f"decode dtype: {self.name} ({why})"


def measures(device: torch.device | str) -> bool:
    """Whether "auto" measures on `device`: a CPU that computes bf16 natively (`utils.native_bf16`; elsewhere bf16
    is emulated and slower, or it is CUDA, where bf16 is the fixed rule's answer), the calibration switch on
    ($FLYTHINKER_DECODE_CALIBRATE), and one process (processes sharing the machine would time each other's load and
    could choose differently for one predictions file)."""
    from ..utils import native_bf16

    device = torch.device(device)
    if device.type != "cpu" or not calibrate.enabled():
        return False
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return False
    return native_bf16(device)


def decode_lms(model: Any) -> list[nn.Module]:
    """The language models a method model decodes with, Generator first: its `generator` and `reasoner` where it
    has them (FlyThinker and the other methods), else the model itself when it is an LM."""
    lms = [m for m in (getattr(model, "generator", None), getattr(model, "reasoner", None))
           if isinstance(m, nn.Module)]
    if not lms and callable(getattr(model, "get_input_embeddings", None)):
        lms = [model]
    return lms


def models_key(lms: Sequence[nn.Module]) -> list[dict[str, Any]]:
    """The models' shape fingerprint without their current dtype (`calibrate.model_key` less "dtype"): the answer
    is about casting them, so an fp32 and a bf16 copy of one model share an entry."""
    return [{k: v for k, v in row.items() if k != "dtype"} for row in calibrate.model_key(lms)]


def choose_decode_dtype(lms: Sequence[nn.Module], batch_size: int, dtype: str = "auto", *,
                        device: torch.device | str | None = None, field_name: str = "dtype",
                        prompt_tokens: int = PROMPT_TOKENS, time_step: calibrate.StepTimer | None = None,
                        path: Path | None = None, ttl: float = calibrate.TTL_S,
                        now: float | None = None) -> DtypeChoice:
    """The weights dtype to decode `lms` in at `batch_size` rows.

    An explicit `dtype` ("float32" / "bfloat16" / "float16") is returned as named. "auto" where `measures(device)`
    (device: the first model's, by default) is false follows the fixed rule (`utils.resolve_dtype`). Otherwise the
    faster of fp32 and bf16 for this machine, these models' shapes and this batch size: from the cache when a fresh
    entry is there, else measured now (`measure_dtypes`) and cached. The models are left as they are (the caller
    casts them); a measurement needs room for one cast copy of one model at a time.

    Args:
        lms: the models a decode runs, Generator first (`decode_lms`): the first decodes with its LM head, the
            rest (a Reasoner, read for its states) without.
        field_name: the setting named in the ValueError for a bad `dtype`.
        time_step: the step timer of `calibrate.measure` (tests inject one); path / ttl / now: the cache file,
            its entries' lifetime, the clock (tests).
    """
    from ..hf import device_of
    from ..safeio import fingerprint
    from ..utils import resolve_dtype

    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if dtype != "auto":
        return DtypeChoice(resolve_dtype(dtype, device, field=field_name), "explicit", batch_size)
    lms = list(lms)
    device = torch.device(device) if device is not None else (device_of(lms[0]) if lms else torch.device("cpu"))
    if not lms or not measures(device):
        return DtypeChoice(resolve_dtype("auto", device), "rule", batch_size)
    path = calibrate.cache_path() if path is None else Path(path)
    now = time.time() if now is None else now
    key = _key(lms, batch_size, prompt_tokens)
    digest = fingerprint(key)
    cached = _cached(path, digest, batch_size, ttl, now)
    if cached is not None:
        return cached
    ms = measure_dtypes(lms, batch_size, prompt_tokens, time_step)
    best = min(DTYPES, key=lambda d: ms[d])  # min keeps the first of equals: fp32
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # recorded to explain a surprising choice
    calibrate.store(path, digest, {"choice": best, "ms": {k: round(v, 4) for k, v in ms.items()},
                                   "measured_at": now, "load_before": load, "key": key})
    return DtypeChoice(getattr(torch, best), "measured", batch_size, ms, digest)


def _key(lms: Sequence[nn.Module], batch_size: int, prompt_tokens: int) -> dict[str, Any]:
    """What the measurement depends on: this machine at the current thread count, the models' shapes, the batch
    size and the probe's context."""
    return {"what": "decode_dtype", "version": VERSION, "machine": calibrate.machine_key(torch.get_num_threads()),
            "models": models_key(lms), "batch": int(batch_size), "prompt_tokens": int(prompt_tokens),
            "dtypes": list(DTYPES)}


def cached_decode_dtype(lms: Sequence[nn.Module], batch_size: int, prompt_tokens: int = PROMPT_TOKENS,
                        path: Path | None = None, ttl: float = calibrate.TTL_S,
                        now: float | None = None) -> DtypeChoice | None:
    """The cached measured choice for these models (only their shapes are read: modules on the meta device do)
    at `batch_size`, when a fresh entry is there; else None. Measures nothing."""
    from ..safeio import fingerprint

    digest = fingerprint(_key(lms, batch_size, prompt_tokens))
    path = calibrate.cache_path() if path is None else Path(path)
    return _cached(path, digest, batch_size, ttl, time.time() if now is None else now)


def _cached(path: Path, digest: str, batch_size: int, ttl: float, now: float) -> DtypeChoice | None:
    entry = calibrate.fresh_entry(path, digest, ttl, now)
    if entry is not None and entry.get("choice") in DTYPES and isinstance(entry.get("ms"), dict):
        return DtypeChoice(getattr(torch, entry["choice"]), "cache", int(batch_size),
                           {k: float(v) for k, v in entry["ms"].items()}, digest)
    return None


def measure_dtypes(lms: Sequence[nn.Module], batch_size: int, prompt_tokens: int = PROMPT_TOKENS,
                   time_step: calibrate.StepTimer | None = None) -> dict[str, float]:
    """Median ms per greedy decode step in each of `DTYPES`, summed over `lms` (a two-model decode step runs one
    step of each; the fusion between them costs the same in both dtypes). One model at a time: the model as it is
    and one copy cast to the other dtype (`_cast_copy`, freed before the next model), each with its own prefilled
    KV cache, stepped in interleaved rounds (`calibrate.measure`). The global RNG and the models' train/eval modes
    are left as they were."""
    cands = [DtypeCandidate(d) for d in DTYPES]
    total = {d: 0.0 for d in DTYPES}
    for i, lm in enumerate(lms):
        was_training = lm.training
        lm.eval()
        copy_lm = None
        try:
            have = next(lm.parameters()).dtype
            copy_lm = _cast_copy(lm, torch.bfloat16 if have != torch.bfloat16 else torch.float32)
            variants = {c.label: (lm if c.dtype == have else copy_lm) for c in cands}
            if have not in (torch.float32, torch.bfloat16):  # e.g. fp16 weights: cast both sides
                variants["float32"] = _cast_copy(lm, torch.float32)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                steps = {label: _probe(m, batch_size, prompt_tokens, with_head=i == 0)
                         for label, m in variants.items()}
                ms = calibrate.measure(lambda c, steps=steps: steps[c.label](), cands, time_step)
            for d in DTYPES:
                total[d] += ms[d]
        finally:
            variants = steps = copy_lm = None  # drop the copies and their caches before the next model
            gc.collect()
            lm.train(was_training)
    return total


def _cast_copy(lm: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `lm` with its floating parameters and buffers in `dtype`, made without a full-size copy at the
    original dtype first: the cast tensors are placed in deepcopy's memo, so deepcopy takes them as the copies."""
    memo: dict[int, Any] = {}
    for p in lm.parameters():
        if id(p) not in memo:  # tied weights: one cast, shared by both places as in the original
            memo[id(p)] = nn.Parameter(p.detach().to(dtype) if p.is_floating_point() else p.detach().clone(),
                                       requires_grad=False)
    for b in lm.buffers():
        if id(b) not in memo:
            memo[id(b)] = b.detach().to(dtype) if b.is_floating_point() else b.detach().clone()
    return copy.deepcopy(lm, memo).eval()


def _probe(lm: nn.Module, batch_size: int, prompt_tokens: int, with_head: bool) -> Callable[[], None]:
    """step(): one greedy decode step of `lm` on its own KV cache, after a prefill of a random (B, T) prompt with
    T = prompt_tokens (less where the model's context is shorter). Without the head (a Reasoner) the step feeds
    back the prompt's last token and runs the decoder stack alone, as a FlyThinker Reasoner step does."""
    from ..hf import base_model, cache_kwargs, context_limit, device_of, embedding_rows, new_cache, output_cache

    limit = context_limit(lm)
    T = max(1, min(int(prompt_tokens), (limit or prompt_tokens + 64) - 64))  # room for the timed steps
    gen = torch.Generator().manual_seed(0)
    dev = device_of(lm)
    ids = torch.randint(0, embedding_rows(lm), (batch_size, T), generator=gen).to(dev)  # (B, T)
    net = lm if with_head else base_model(lm)
    cache = new_cache(lm)
    out = net(input_ids=ids, use_cache=True, **cache_kwargs(net, cache))
    returned = output_cache(out)
    cache = returned if returned is not None else cache  # the same object for a DynamicCache, updated in place
    state = {"token": ids[:, -1:], "pos": T}  # (B, 1) the token fed next

    def step() -> None:
        pos = torch.full((batch_size, 1), state["pos"], dtype=torch.long, device=dev)  # (B, 1)
        o = net(input_ids=state["token"], position_ids=pos, use_cache=True, **cache_kwargs(net, cache))
        if with_head:
            state["token"] = o.logits[:, -1:].argmax(-1)  # (B, 1) greedy
        state["pos"] += 1

    return step


__all__ = ["DTYPES", "PROMPT_TOKENS", "DtypeCandidate", "DtypeChoice", "cached_decode_dtype", "choose_decode_dtype",
           "decode_lms",
           "measure_dtypes", "measures", "models_key"]
