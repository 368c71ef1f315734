"""Small process-level helpers: seeding, thread counts, device/dtype choice, rank-0 printing, user-facing errors.

Nothing here runs at import time; callers opt in explicitly (e.g. the CLI calls `set_threads` once at start-up).
"""

from __future__ import annotations

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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively (CUDA with bf16 support); None means plain fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs)
