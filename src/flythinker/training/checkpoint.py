"""Training checkpoints: one HF-style directory per save, written atomically, and the state needed to resume exactly.

Layout of `out/step-000100/` (and `out/final/`):
    generator/ reasoner/ flythinker.json fusion.safetensors   <- FlyThinker.save_pretrained (loads for inference)
    training_state.pt                                         <- optimizer, scheduler, RNG, step, data position
    train_config.json                                         <- the full TrainConfig, human-readable
A directory is first written as `.tmp-<name>` and renamed into place, so a kill never leaves a half checkpoint
that `--resume` would pick up. `latest_checkpoint` finds the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_NAME = "training_state.pt"
CONFIG_NAME = "train_config.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, name: str, model, training_state: dict[str, Any] | None,
                    config: dict[str, Any]) -> Path:
    """Write `out_dir/name` atomically. `model` is a FlyThinker (unwrapped); returns the final path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tmp = out_dir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if training_state is not None:
        torch.save(training_state, tmp / STATE_NAME)
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if final.exists():  # re-saving the same step (e.g. final/): swap via a second rename so it is never missing
        old = out_dir / f".old-{name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete `step-N` directory with the largest N (temp dirs are ignored), or None."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for p in out_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / STATE_NAME).is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None


def load_training_state(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=False)


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Keep only the newest `keep` step directories (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := _STEP_RE.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
