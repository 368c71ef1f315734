"""Small process-level helpers: seeding, thread counts, device/dtype choice, rank-0 printing, user-facing errors.

The dtype choice has one source: `native_bf16(device)` says whether the hardware computes bf16 natively (a CUDA GPU
with bf16, a CPU with AVX512-BF16 or AMX-BF16); training's precision "auto" and every `--dtype auto` follow it
(`autocast_dtype`, `resolve_dtype`). Nothing here runs at import time; callers opt in explicitly (e.g. the CLI
calls `set_threads` once at start-up).
"""

from __future__ import annotations

import functools
import os
import random

import numpy as np
import torch


class UserError(Exception):
    """An error caused by the user's input (file, flag, data). The CLI prints it as one line and exits 2."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(n: int | None = None) -> int:
    """Set torch intra-op threads once, deliberately: oversubscribed threads on 2 cores run ~10x slower.

    n=None: $FLYTHINKER_THREADS, else the number of cores this process may use."""
    if n is None:
        env = os.environ.get("FLYTHINKER_THREADS")
        n = int(env) if env else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(1, int(n or 1))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


NATIVE_BF16_ENV = "FLYTHINKER_NATIVE_BF16"
"""Overrides `native_bf16` for every device: 0 = never (fp32 everywhere, e.g. the exactness tests), 1 = always."""

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The values of every `dtype` setting (generate --dtype, serve --dtype, model.dtype)."""

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# CPU feature flags (Linux /proc/cpuinfo names) under which oneDNN runs bf16 matmuls in hardware; without them bf16
# is emulated and slower than fp32.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpuinfo_has_bf16(text: str) -> bool | None:
    """Whether a /proc/cpuinfo text's first "flags" line lists AVX512-BF16 or AMX-BF16; None when it has no such
    line (not x86 Linux)."""
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            flags = set(line.split(":", 1)[1].split())
            return any(f in flags for f in _CPU_BF16_FLAGS)
    return None


@functools.lru_cache(maxsize=1)
def _cpu_native_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 or AMX-BF16 (read once per process)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            found = cpuinfo_has_bf16(fh.read())
    except OSError:
        found = None
    if found is not None:
        return found
    # No x86 flags to read (not Linux, or not x86): torch's own cpuinfo probe, where this torch has it (private).
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(probe()) if callable(probe) else False
    except RuntimeError:
        return False


def native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether `device` (default: `default_device()`) computes bf16 natively: a CUDA GPU with bf16 support, or a
    CPU with AVX512-BF16 or AMX-BF16. $FLYTHINKER_NATIVE_BF16 (0 or 1) overrides the answer for every device."""
    env = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if env:
        if env not in ("0", "1"):
            raise UserError(f"{NATIVE_BF16_ENV} must be 0 or 1; got {env!r}")
        return env == "1"
    device = default_device() if device is None else torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively (`native_bf16`); None means plain fp32."""
    return torch.bfloat16 if native_bf16(device) else None


def resolve_dtype(name: str, device: torch.device | str | None = None, field: str = "dtype") -> torch.dtype:
    """The weights dtype a decoding `dtype` setting names: "auto" = bf16 where `device` computes it natively
    (`native_bf16`), else fp32; "float32" / "bfloat16" / "float16" as named. `field` names the setting in the
    ValueError for anything else."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in _TORCH_DTYPES:
        raise ValueError(f"{field} must be one of {', '.join(DTYPES)}; got {name!r}")
    return _TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32 and so on (the names `resolve_dtype` reads and the benches report)."""
    return str(dtype).replace("torch.", "")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs)
