"""The optimizer set-up: AdamW parameter groups per trainable part of a method's model, the AdamW implementation
(`train.optimizer_impl`: fused / foreach / for-loop, kept across a resume), and the learning-rate schedule (linear
warmup, then cosine / linear decay to a floor, or constant)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..utils import UserError
from .config import TrainArgs

ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8

FUSED_DEVICES = ("cpu", "cuda")
"""Device types where "auto" picks torch's fused AdamW: its kernels there take every float dtype (fp32, bf16,
fp16, fp64). torch lists more devices as fused-capable, with narrower dtype support, so those get foreach."""


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


def resolve_optimizer_impl(impl: str, device: torch.device | str) -> str:
    """"fused", "foreach" or "for-loop": what `train.optimizer_impl` means for training on `device` ("auto": fused
    on FUSED_DEVICES, else foreach where torch has foreach kernels for the device, else for-loop). An explicit
    choice the device lacks is a UserError naming the field."""
    from torch.optim.optimizer import _get_foreach_kernels_supported_devices, _get_fused_kernels_supported_devices

    if impl not in ("auto", "fused", "foreach", "for-loop"):
        raise UserError(f"train.optimizer_impl: must be one of auto, fused, foreach, for-loop; got {impl!r}")
    kind = torch.device(device).type
    if impl == "auto":
        if kind in FUSED_DEVICES:
            return "fused"
        return "foreach" if kind in _get_foreach_kernels_supported_devices() else "for-loop"
    if impl == "fused" and kind not in _get_fused_kernels_supported_devices():
        raise UserError(f"train.optimizer_impl: torch has no fused AdamW for {kind}; use foreach or for-loop")
    return impl


def build_optimizer(groups: list[dict[str, Any]], impl: str) -> torch.optim.AdamW:
    """AdamW over `groups` (see `param_groups`) with the run's betas / eps, computed by `impl` (a resolved
    implementation, `resolve_optimizer_impl`). The parameters may still move device before the first step (the
    checks run at the step)."""
    return torch.optim.AdamW(groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, **_impl_flags(impl))


def _impl_flags(impl: str) -> dict[str, bool]:
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def apply_optimizer_impl(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Make a restored `optimizer` compute by `impl` again. `load_state_dict` (and the engines' load_state) takes
    the saved groups whole, their fused / foreach flags included, so a checkpoint would otherwise impose the
    implementation it was written under. The step counters are moved to where `impl` keeps them (fused: fp32 on
    the parameter's device; otherwise on the CPU), as a fresh optimizer of `impl` would create them."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    flags = _impl_flags(impl)
    for group in inner.param_groups:
        group.update(flags)
        on_device = flags["fused"] or group.get("capturable", False)
        for p in group["params"]:
            step = inner.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                inner.state[p]["step"] = step.to(device=p.device, dtype=torch.float32) if on_device else step.cpu()


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
