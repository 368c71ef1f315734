"""The optimizer set-up: AdamW parameter groups per trainable part of a method's model, and the learning-rate
schedule (linear warmup, then cosine / linear decay to a floor, or constant)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..utils import UserError
from .config import TrainArgs


def param_groups(model: nn.Module, args: TrainArgs) -> list[dict[str, Any]]:
    """One AdamW group per (part, decay/no-decay), parts from `model.trainable_parts()` with learning rate
    `args.lr_<part>`; norms and biases are not decayed."""
    groups = []
    for name, module in model.trainable_parts():
        lr = getattr(args, f"lr_{name}", None)
        if lr is None:
            raise UserError(f"the model has a trainable part {name!r} but train has no lr_{name}")
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": args.weight_decay})
        if no_decay:
            groups.append({"name": name, "params": no_decay, "lr": lr, "weight_decay": 0.0})
    if not groups:
        raise UserError("nothing to train: every parameter is frozen")
    return groups


def lr_lambda(args: TrainArgs, total_steps: int):
    """Multiplier of the peak LR at optimizer step s: linear warmup, then cosine/linear decay to min_lr_ratio."""
    warmup = max(1, math.ceil(args.warmup_ratio * total_steps)) if args.warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * shape

    return f
