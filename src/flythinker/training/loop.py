"""The training loop, method-agnostic (paper Algorithm 1, Eq. 7-9 for FlyThinker; the same loop trains SFT and any
other method's model).

Owns `fit`: gradient accumulation normalized by supervised-token count across the window and all processes,
clipping, autocast, a JSONL loss log, a progress bar, periodic atomic checkpoints, exact resume of this run only
(never another run's checkpoints: see `checkpoint.run_identity`), an exclusive lock on the out_dir, and a stop with
a one-line error on a non-finite loss or gradient; the
deterministic, shardable data order (`windows_for_epoch`); and `validate` (teacher-forced dev NLL). Runs
single-process on CPU/GPU and under `accelerate launch` (DDP) unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..config import to_dict
from ..data.collate import IGNORE_INDEX, collate
from ..safeio import check_output_dir
from ..utils import UserError, seed_everything
from .checkpoint import (
    LOG_NAME,
    STATE_NAME,
    CheckpointError,
    check_checkpoint_files,
    check_same_run,
    claim_out_dir,
    load_training_state,
    prune_checkpoints,
    remove_checkpoints_after,
    rng_state,
    run_identity,
    run_lock,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
    truncate_log,
)
from .config import TrainArgs
from .optim import lr_lambda, param_groups


def _batch(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch (input_ids, attention_mask, labels) from encoded features."""
    b = collate(features, pad_token_id, padding_side="right")
    return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}


def windows_for_epoch(n: int, epoch: int, args: TrainArgs, world: int) -> list[list[list[int]]]:
    """Example indices for one epoch: a list of optimizer windows, each a list of global micro-batches.

    The order is a seeded permutation per epoch, identical on every process; each global micro-batch holds
    batch_size * world indices and process `rank` takes its slice, so resuming only needs (epoch, window)."""
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per = args.batch_size * world
    micro = [perm[i: i + per] for i in range(0, n, per)]
    # Pad a short last micro-batch by wrapping so every process gets a full slice (DDP needs equal step counts).
    if micro and len(micro[-1]) < per:
        micro[-1] = (micro[-1] + perm * per)[:per]
    return [micro[i: i + args.grad_accum] for i in range(0, len(micro), args.grad_accum)]


def total_optimizer_steps(n: int, args: TrainArgs, world: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    micro = math.ceil(n / (args.batch_size * world))
    return args.epochs * math.ceil(micro / args.grad_accum)


@dataclass
class FitResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float = 0.0
    final_dir: Path | None = None


def fit(model: nn.Module, features: Sequence[dict[str, Any]], args: TrainArgs, pad_token_id: int,
        config: dict[str, Any] | None = None, accelerator: Any = None) -> FitResult:
    """Train `model` on pre-encoded `features` (see `flythinker.data.collate`). Returns per-step losses and timing.

    `model` is any method's model: forward(input_ids, attention_mask, labels) returning `loss_sum` and `n_tokens`,
    `trainable_parts()` for the optimizer groups, optionally `prepare_training(features, calibration_examples,
    pad_token_id)` run before any weight is loaded or updated, and `save_pretrained` / `from_pretrained`.

    Loss normalization: within an optimizer window (grad_accum micro-batches x all processes) every supervised
    token weighs the same, i.e. loss = Σ NLL / Σ tokens over the window, not a mean of per-batch means.

    The out_dir is this run's for the whole call: its lock is held (main process), a fresh run refuses an out_dir
    holding another run unless `args.overwrite`, and a resume accepts only a checkpoint of the same run
    (`checkpoint.run_identity`), falling back past unreadable checkpoints with a one-line note on stderr. A
    non-finite loss or gradient norm stops training with a UserError before the optimizer step, so no NaN weights
    are ever saved. `config` is what train_config.json records and (minus the train section, which always comes
    from `args`) part of the run identity.
    """
    from accelerate import Accelerator

    if not features:
        raise UserError("no training examples")
    if accelerator is None:
        mp = "bf16" if args.precision == "bf16" or (args.precision == "auto" and _native_bf16()) else "no"
        accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    out_dir = check_output_dir(args.out_dir, "train.out_dir")
    config = config or {"train": to_dict(args)}
    identity = run_identity(config, to_dict(args), features, accelerator.num_processes)

    stack = contextlib.ExitStack()
    error: UserError | None = None
    if accelerator.is_main_process:
        try:
            stack.enter_context(run_lock(out_dir))
            claim_out_dir(out_dir, identity, resume=args.resume, overwrite=args.overwrite)
        except UserError as e:
            error = e
        except OSError as e:
            error = UserError(f"train.out_dir {out_dir}: {e.strerror or e}")
    # Every process learns whether the main one may train here, so none waits forever at a later barrier.
    if not _all_ok(accelerator, error is None):
        stack.close()
        raise error or UserError(f"train.out_dir {out_dir}: the main process refused it (see its error)")
    with stack:
        return _fit(model, features, args, pad_token_id, config, accelerator, out_dir, identity)


def _fit(model: nn.Module, features: Sequence[dict[str, Any]], args: TrainArgs, pad_token_id: int,
         config: dict[str, Any], accelerator: Any, out_dir: Path, identity: dict[str, Any]) -> FitResult:
    from tqdm.auto import tqdm

    world, rank = accelerator.num_processes, accelerator.process_index
    seed_everything(args.seed)
    # Before any weight is loaded or updated: the statistics come from the untrained Reasoner, so a resumed run
    # recomputes exactly the values it started with.
    prepare = getattr(model, "prepare_training", None)
    if callable(prepare):
        prepare(features, args.calibration_examples, pad_token_id)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, args), betas=(0.9, 0.95), eps=1e-8)
    total = total_optimizer_steps(len(features), args, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total))

    step, epoch, window = 0, 0, 0
    last_saved: Path | None = None
    if args.resume and not args.overwrite:
        found = _resumable_checkpoint(model, out_dir, identity, accelerator)
        if found is not None:
            ckpt, state, weights = found
            model.load_state_dict(weights, strict=state.get("trainable") is None)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
            step, epoch, window = state["step"], state["epoch"], state["window"]
            last_saved = ckpt
            accelerator.print(f"resumed from {ckpt} at step {step}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_checkpoints_after(out_dir, step)  # unreadable ones skipped above; this run rewrites those steps
        truncate_log(out_dir, step)  # steps after the checkpoint are redone: log them once
    wrapped = accelerator.prepare(model)
    device = accelerator.device

    log_path = out_dir / LOG_NAME
    bar = tqdm(total=total, initial=step, desc="train", disable=not (args.progress and accelerator.is_main_process),
               dynamic_ncols=True)
    result = FitResult(steps=step)
    t_start = time.perf_counter()

    def windows() -> Iterator[tuple[int, int, list[list[int]]]]:
        e = epoch
        while True:
            for w, win in enumerate(windows_for_epoch(len(features), e, args, world)):
                if e == epoch and w < window:
                    continue
                yield e, w, win
            e += 1

    try:
        for e, w, win in windows():
            if step >= total:
                break
            t0 = time.perf_counter()
            batches = [_batch([features[i] for i in micro[rank * args.batch_size:(rank + 1) * args.batch_size]],
                              pad_token_id) for micro in win]
            local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            window_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=device), reduction="sum"))
            loss_sum_local = torch.zeros((), device=device)
            for j, b in enumerate(batches):
                b = {k: v.to(device) for k, v in b.items()}
                sync = j == len(batches) - 1
                ctx = accelerator.no_sync(wrapped) if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx, accelerator.autocast():
                    out = wrapped(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                    # DDP averages gradients over processes, so scale by world to make the result Σ NLL / Σ tokens.
                    loss = out.loss_sum * world / max(1, window_tokens)
                accelerator.backward(loss)
                loss_sum_local += out.loss_sum.detach().float()
            loss_value = float(accelerator.reduce(loss_sum_local, reduction="sum")) / max(1, window_tokens)
            grad_norms = _grad_norms(model)
            # Same values on every process (reduced loss, synchronized gradients), so all stop together.
            _check_finite(step + 1, loss_value, grad_norms, last_saved)
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(loss_value)
            dt = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if accelerator.is_main_process and (step % args.log_every == 0 or step == total):
                rec = {"step": step, "epoch": e, "loss": loss_value, "tokens": window_tokens, "seconds": round(dt, 4)}
                for g in optimizer.param_groups:
                    rec.setdefault(f"lr_{g['name']}", g["lr"])
                rec.update({f"grad_norm_{k}": v for k, v in grad_norms.items()})
                with log_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            if args.save_every > 0 and step % args.save_every == 0:
                next_e, next_w = _next_position(e, w, len(features), args, world)
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": accelerator.gather_for_metrics([rng_state()]) if world > 1 else rng_state(),
                         "step": step, "epoch": next_e, "window": next_w, "trainable": _lora_state(model),
                         "run": identity}
                if accelerator.is_main_process:
                    last_saved = save_checkpoint(out_dir, f"step-{step:06d}", accelerator.unwrap_model(wrapped),
                                                 state, config)
                    prune_checkpoints(out_dir, args.keep_checkpoints)
                accelerator.wait_for_everyone()
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start
    result.steps = step
    result.seconds_per_step = elapsed / max(1, len(result.losses))
    if args.save_final and accelerator.is_main_process:
        result.final_dir = save_checkpoint(out_dir, "final", accelerator.unwrap_model(wrapped), None, config)
    accelerator.wait_for_everyone()
    model.eval()
    return result


def _all_ok(accelerator: Any, ok: bool) -> bool:
    """True when `ok` holds on every process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor(0 if ok else 1, device=accelerator.device)
    return int(accelerator.reduce(flag, reduction="sum")) == 0


def _check_finite(step: int, loss: float, grad_norms: dict[str, float], last_saved: Path | None) -> None:
    """Stop before the optimizer step when the loss or a gradient norm is NaN / inf: continuing would turn every
    weight into NaN and save it."""
    bad = [] if math.isfinite(loss) else [f"loss {loss}"]
    bad += [f"{name} gradient norm {v}" for name, v in grad_norms.items() if not math.isfinite(v)]
    if bad:
        kept = f"the last checkpoint {last_saved} is intact" if last_saved is not None else "no checkpoint was saved"
        raise UserError(f"training diverged at step {step}: non-finite {', '.join(bad)}; nothing was saved for this "
                        f"step ({kept}); lower the learning rates (train.lr_*) or model.fusion.lam, or check the data")


def _resumable_checkpoint(model: nn.Module, out_dir: Path, identity: dict[str, Any],
                          accelerator: Any) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """The newest step-N of this run that reads back whole: (path, training state, weights to load). Unreadable
    ones are skipped (one note on stderr when an earlier one is used); another run's checkpoint is refused; none
    usable while some exist is a UserError naming the newest bad file. Loads nothing into `model`."""
    skipped: list[CheckpointError] = []
    for _, ckpt in step_checkpoints(out_dir):
        try:
            state = load_training_state(ckpt)
        except CheckpointError as e:
            skipped.append(e)
            continue
        check_same_run(state.get("run"), identity, ckpt / STATE_NAME, out_dir)
        try:
            check_checkpoint_files(ckpt)
            weights = _checkpoint_weights(model, ckpt, state)
        except CheckpointError as e:
            skipped.append(e)
            continue
        if skipped and accelerator.is_main_process:
            more = f" (and {len(skipped) - 1} newer)" if len(skipped) > 1 else ""
            print(f"flythinker: note: {skipped[0].path} is unusable ({skipped[0].reason}){more}; resuming from the "
                  f"earlier checkpoint {ckpt}", file=sys.stderr, flush=True)
        return ckpt, state, weights
    if skipped:
        e = skipped[0]
        raise UserError(f"cannot resume from train.out_dir {out_dir}: {e.path} is unusable ({e.reason}) and no "
                        f"earlier checkpoint is usable; pass --train.overwrite true to start over")
    return None


def _next_position(e: int, w: int, n: int, args: TrainArgs, world: int) -> tuple[int, int]:
    n_windows = len(windows_for_epoch(n, e, args, world))
    return (e, w + 1) if w + 1 < n_windows else (e + 1, 0)


def _grad_norms(model: nn.Module) -> dict[str, float]:
    out = {}
    for name, module in model.trainable_parts():
        grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
        if grads:
            out[name] = float(torch.stack(grads).norm())
    return out


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """With LoRA the step directory holds merged weights; the adapters themselves are kept for exact resume."""
    if not any(hasattr(m, "merge_and_unload") for _, m in model.trainable_parts()):
        return None
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def _checkpoint_weights(model: nn.Module, ckpt: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained weights of checkpoint `ckpt` for the freshly built `model` (same architecture / LoRA set-up as
    when saved): the LoRA adapters kept in the training state, else the saved model's state dict. A
    CheckpointError when the files do not load; a UserError when they do not fit the model."""
    if state.get("trainable") is not None:
        weights = state["trainable"]
        unexpected = sorted(set(weights) - set(model.state_dict()))
        if unexpected:
            raise UserError(f"{ckpt}: checkpoint does not match the model set-up ({unexpected[:2]})")
        return weights
    try:
        saved = type(model).from_pretrained(ckpt, load_tokenizer=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(ckpt, f"does not load: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") \
            from None
    weights = saved.state_dict()
    mine = model.state_dict()
    if set(weights) != set(mine) or any(weights[k].shape != mine[k].shape for k in mine):
        raise UserError(f"{ckpt}: checkpoint does not match the model set-up")
    return weights


def _native_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@torch.no_grad()
def validate(model: nn.Module, features: Sequence[dict[str, Any]], pad_token_id: int, batch_size: int = 4) -> float:
    """Mean next-token NLL per supervised token over `features` (teacher-forced)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(features), batch_size):
        b = {k: v.to(device) for k, v in _batch(features[i: i + batch_size], pad_token_id).items()}
        out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        total += float(out.loss_sum)
        n += int(out.n_tokens)
    model.train(was_training)
    return total / max(1, n)
