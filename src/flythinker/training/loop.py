"""The training loop, method-agnostic (paper Algorithm 1, Eq. 7-9 for FlyThinker; the same loop trains SFT and any
other method's model).

Owns `fit`: gradient accumulation normalized by supervised-token count across the window and all processes,
clipping, autocast, a JSONL loss log, a progress bar, periodic atomic checkpoints, exact resume of this run only
(never another run's checkpoints: see `checkpoint.run_identity`), an exclusive lock on the out_dir, and a stop with
a one-line error on a non-finite loss or gradient; the
deterministic, shardable data order (`windows_for_epoch`); and `validate` (teacher-forced dev NLL). Runs
single-process on CPU/GPU and under `accelerate launch` unchanged: DDP, or a sharded engine (FSDP2, DeepSpeed ZeRO)
that shards both models' parameters, gradients and optimizer state (docs/scaling.md). Model, optimizer, scheduler
and data loader all go through `accelerator.prepare`; the saved model directory is the same HF layout whatever the
engine.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import to_dict
from ..data.collate import IGNORE_INDEX, collate
from ..safeio import check_output_dir
from ..utils import UserError, seed_everything
from .checkpoint import (
    ENGINE_DIR,
    LOG_NAME,
    STATE_NAME,
    CheckpointError,
    begin_checkpoint,
    check_checkpoint_files,
    check_engine_files,
    check_same_run,
    claim_out_dir,
    finish_checkpoint,
    load_training_state,
    prune_checkpoints,
    remove_checkpoints_after,
    rng_state,
    run_identity,
    run_lock,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
    temporary_path,
    truncate_log,
)
from .config import TrainArgs
from .optim import apply_optimizer_impl, build_optimizer, lr_lambda, param_groups, resolve_optimizer_impl

SHARDED_ENGINES = ("fsdp", "deepspeed")
"""Engines whose processes each hold only a shard of the weights and optimizer state."""


def _batch(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch (input_ids, attention_mask, labels) from encoded features."""
    b = collate(features, pad_token_id, padding_side="right")
    return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}


def windows_for_epoch(n: int, epoch: int, args: TrainArgs, world: int,
                      stages: Sequence[int] | None = None) -> list[list[list[int]]]:
    """Example indices for one epoch: a list of optimizer windows, each a list of global micro-batches.

    The order is a seeded permutation per epoch, identical on every process; each global micro-batch holds
    batch_size * world indices and process `rank` takes its slice, so resuming only needs (epoch, window).
    `stages` (a curriculum: each feature's "stage", e.g. Coconut's) orders the epoch stage by stage, shuffled within."""
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if stages is not None:
        perm.sort(key=stages.__getitem__)  # stable: the permutation's order within each stage
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


def planned_windows(n: int, args: TrainArgs, world: int, epoch: int, window: int, steps: int,
                    stages: Sequence[int] | None = None) -> Iterator[tuple[int, int, list[list[int]]]]:
    """The next `steps` optimizer windows from position (epoch, window): (epoch, window index, global
    micro-batches), crossing epochs as needed. Lazy and deterministic, so the sampler and the loop walk the same
    plan independently."""
    e, done = epoch, 0
    while done < steps:
        for w, win in enumerate(windows_for_epoch(n, e, args, world, stages)):
            if e == epoch and w < window:
                continue
            yield e, w, win
            done += 1
            if done == steps:
                return
        e += 1


class WindowSampler:
    """Batch sampler of a run's plan in the order accelerate deals batches out.

    For every global micro-batch it yields the `world` per-process slices in rank order; accelerate's sharding
    (`BatchSamplerShard`: batch k * world + r goes to process r) then gives process r exactly slice r, the same
    assignment as `windows_for_epoch` describes, so one process with batch B * world and world processes with
    batch B see the same global micro-batches."""

    def __init__(self, plan: Any, batch_size: int, world: int):
        self.plan, self.batch_size, self.world = plan, batch_size, world
        self._len: int | None = None

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, win in self.plan():
            for micro in win:
                for r in range(self.world):
                    yield micro[r * self.batch_size:(r + 1) * self.batch_size]

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(len(win) for _, _, win in self.plan()) * self.world
        return self._len


def engine_of(accelerator: Any) -> str:
    """"fsdp" or "deepspeed" for accelerate's sharded engines, else "ddp" (one process, or DDP)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp"


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
    (`checkpoint.run_identity`) written under the same engine, falling back past unreadable checkpoints with a
    one-line note on stderr. A non-finite loss or gradient norm stops training with a UserError before the
    optimizer step, so no NaN weights are ever saved. `config` is what train_config.json records and (minus the
    train section, which always comes from `args`) part of the run identity.

    Under a sharded engine (an FSDP2 or DeepSpeed accelerate config) `model` is sharded in place and stays so
    after the call; read the trained weights from out_dir/final (same layout as ever) or with
    `accelerator.get_state_dict`.
    """
    from accelerate import Accelerator

    if not features:
        raise UserError("no training examples")
    if accelerator is None:
        mp = "bf16" if resolve_precision(args.precision) == "bf16" else "no"
        _allow_precision(mp)
        accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    out_dir = check_output_dir(args.out_dir, "train.out_dir")
    resolve_optimizer_impl(args.optimizer_impl, accelerator.device)  # refused before out_dir is claimed
    config = config or {"train": to_dict(args)}
    # The identity records the precision this run computes in, not "auto": auto means bf16 on hardware that runs it
    # natively and fp32 elsewhere, and a run started in one must not be resumed (or reused) as the other.
    resolved = "bf16" if str(accelerator.mixed_precision) == "bf16" else \
        "fp16" if str(accelerator.mixed_precision) == "fp16" else "fp32"
    identity = run_identity(config, {**to_dict(args), "precision": resolved}, features, accelerator.num_processes)

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
    engine = engine_of(accelerator)
    sharded = engine in SHARDED_ENGINES
    seed_everything(args.seed)
    # Before any weight is loaded or updated: the statistics come from the untrained Reasoner, so a resumed run
    # recomputes exactly the values it started with.
    prepare = getattr(model, "prepare_training", None)
    if callable(prepare):
        prepare(features, args.calibration_examples, pad_token_id)
    model.train()
    _configure_engine(accelerator, engine, model, args)
    # A weightless copy taken before the engine shards `model`: saving fills it with the gathered full weights
    # and calls the method's own save_pretrained, so every engine writes the same HF-style directory.
    skeleton = meta_copy(model) if sharded else None
    # Resolved for the device training runs on (prepare may move the parameters there after this).
    impl = resolve_optimizer_impl(args.optimizer_impl, accelerator.device)
    optimizer = build_optimizer(param_groups(model, args), impl)
    total = total_optimizer_steps(len(features), args, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total))

    step, epoch, window = 0, 0, 0
    last_saved: Path | None = None
    resumed: tuple[Path, dict[str, Any]] | None = None
    if args.resume and not args.overwrite:
        found = _resumable_checkpoint(model, out_dir, identity, accelerator, engine)
        if found is not None:
            ckpt, state, weights = found
            if not sharded:  # a sharded engine restores its shards with load_state once prepared (below)
                model.load_state_dict(weights, strict=state.get("trainable") is None)
                optimizer.load_state_dict(state["optimizer"])
                apply_optimizer_impl(optimizer, impl)  # the saved groups carry the implementation they ran with
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, window = state["step"], state["epoch"], state["window"]
            last_saved, resumed = ckpt, (ckpt, state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_checkpoints_after(out_dir, step)  # unreadable ones skipped above; this run rewrites those steps
        truncate_log(out_dir, step)  # steps after the checkpoint are redone: log them once

    stages = [int(f.get("stage", 0)) for f in features] if any("stage" in f for f in features) else None
    plan = partial(planned_windows, len(features), args, world, epoch, window, max(0, total - step), stages)
    # The loader's own generator seeds its iterator, so iterating it never draws from the global RNG that dropout
    # uses (a resumed run would otherwise start one draw off).
    loader = torch.utils.data.DataLoader(features, batch_sampler=WindowSampler(plan, args.batch_size, world),
                                         collate_fn=partial(_batch, pad_token_id=pad_token_id),
                                         generator=torch.Generator().manual_seed(args.seed))
    wrapped, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    if hasattr(scheduler, "step_with_optimizer"):
        # accelerate's wrapper would step the schedule once per process per optimizer step (its convention for
        # per-process batch sizes); ours counts optimizer steps of the global batch.
        scheduler.step_with_optimizer = False
    if resumed is not None:
        ckpt, state = resumed
        if sharded:
            accelerator.load_state(str(ckpt / ENGINE_DIR))
            if engine == "fsdp":  # DeepSpeed's optimizer wraps torch's in its own; its state stays as saved
                apply_optimizer_impl(optimizer, impl)
        follow_schedule(scheduler)
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        accelerator.print(f"resumed from {ckpt} at step {step}")
    device = accelerator.device

    def save(name: str, state: dict[str, Any] | None) -> Path | None:
        """Checkpoint `name` (with the training state when given); every process calls it. Returns the path on
        the main process."""
        path = None
        if not sharded:
            if accelerator.is_main_process:
                path = save_checkpoint(out_dir, name, accelerator.unwrap_model(wrapped), state, config)
            accelerator.wait_for_everyone()
            return path
        if accelerator.is_main_process:
            begin_checkpoint(out_dir, name)
        accelerator.wait_for_everyone()
        if state is not None:
            accelerator.save_state(str(temporary_path(out_dir, name) / ENGINE_DIR))  # every process its shard
        weights = accelerator.get_state_dict(wrapped)  # a collective; the whole state dict on the main process
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            path = finish_checkpoint(out_dir, name, full_model(skeleton, weights), state, config)
        accelerator.wait_for_everyone()
        return path

    log_path = out_dir / LOG_NAME
    bar = tqdm(total=total, initial=step, desc="train", disable=not (args.progress and accelerator.is_main_process),
               dynamic_ncols=True)
    result = FitResult(steps=step)
    t_start = time.perf_counter()
    batches_in = iter(loader)
    # The engines average gradients over processes, so scaling by world makes the result Σ NLL / Σ tokens;
    # `_backward_scale` undoes the engine's own division of the loss inside accelerator.backward.
    scale = world * _backward_scale(accelerator, wrapped, engine)
    try:
        for e, w, win in plan():
            t0 = time.perf_counter()
            batches = [next(batches_in) for _ in win]  # this process's slice of each micro-batch, on its device
            # One device tensor, read once after the reduce (not one host sync per micro-batch).
            local_tokens = sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches)
            window_tokens = int(accelerator.reduce(local_tokens.to(device), reduction="sum"))
            loss_sum_local = torch.zeros((), device=device)
            for j, b in enumerate(batches):
                sync = j == len(batches) - 1
                ctx = accelerator.no_sync(wrapped) if (world > 1 and not sync) else contextlib.nullcontext()
                if engine == "deepspeed":  # DeepSpeed steps inside the backward that closes the window
                    accelerator.gradient_state._set_sync_gradients(sync)
                with ctx, accelerator.autocast():
                    out = wrapped(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                    loss = out.loss_sum * scale / max(1, window_tokens)
                loss_sum_local += out.loss_sum.detach().float()
                if sync:
                    loss_value = float(accelerator.reduce(loss_sum_local, reduction="sum")) / max(1, window_tokens)
                    # Before the last backward: DeepSpeed's step is part of it.
                    _check_finite(step + 1, loss_value, {}, last_saved)
                accelerator.backward(loss)
            if engine == "deepspeed":
                accelerator.gradient_state._set_sync_gradients(True)
                norm = accelerator.clip_grad_norm_(wrapped.parameters(), args.max_grad_norm)
                grad_norms = {} if norm is None else {"all": float(norm)}
                _check_finite(step + 1, loss_value, grad_norms, last_saved)  # after the fact: nothing is saved
            else:
                grad_norms = _grad_norms(model, accelerator, sharded)  # FSDP2 shards `model` in place
                # Same values on every process (reduced loss, synchronized gradients), so all stop together.
                _check_finite(step + 1, loss_value, grad_norms, last_saved)
                if args.max_grad_norm > 0 and _clips_from_norms(accelerator, sharded):
                    clip_to_norm(model, args.max_grad_norm, grad_norms)
                elif args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_([p for p in wrapped.parameters() if p.requires_grad],
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
                for i, g in enumerate(optimizer.param_groups):
                    rec.setdefault(f"lr_{g.get('name', i)}", g["lr"])
                rec.update({f"grad_norm_{k}": v for k, v in grad_norms.items()})
                with log_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            if args.save_every > 0 and step % args.save_every == 0:
                next_e, next_w = _next_position(e, w, len(features), args, world)
                state = {"optimizer": None if sharded else optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(),
                         "rng": accelerator.gather_for_metrics([rng_state()]) if world > 1 else rng_state(),
                         "step": step, "epoch": next_e, "window": next_w,
                         "trainable": None if sharded else _lora_state(model), "engine": engine, "run": identity}
                saved = save(f"step-{step:06d}", state)
                if accelerator.is_main_process:
                    last_saved = saved
                    prune_checkpoints(out_dir, args.keep_checkpoints)
                accelerator.wait_for_everyone()
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start
    result.steps = step
    result.seconds_per_step = elapsed / max(1, len(result.losses))
    if args.save_final:
        final = save("final", None)
        if accelerator.is_main_process:
            result.final_dir = final
    accelerator.wait_for_everyone()
    model.eval()
    return result


def _configure_engine(accelerator: Any, engine: str, model: nn.Module, args: TrainArgs) -> None:
    """Settings a sharded engine takes from the run before `prepare`: FSDP2 wraps each decoder layer of the
    method's language models in its own unit; DeepSpeed's batch / accumulation / clipping come from `args` (a
    differing value in its config is replaced, with a note). A launch that asked for a sharded engine which
    accelerate did not start (it runs FSDP and DeepSpeed on accelerators only) is a UserError: it would silently
    train with full copies on every process."""
    for env, name in (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "deepspeed")):
        if os.environ.get(env, "false").lower() == "true" and engine != name:
            raise UserError(f"the accelerate config asks for {name} but accelerate started {engine} (it runs FSDP "
                            f"and DeepSpeed on GPUs/accelerators only, not on CPU); use configs/accelerate/ddp.yaml "
                            f"here or launch on GPUs")
    if engine == "fsdp":
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise UserError(f"FSDP version {plugin.fsdp_version}: flythinker trains with FSDP2; set fsdp_version: 2 "
                            f"in the accelerate config's fsdp_config (see configs/accelerate_fsdp.yaml)")
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
        if policy is transformer_auto_wrap_policy and not plugin.transformer_cls_names_to_wrap:
            # accelerate reads `_no_split_modules` of the top model, which a method's wrapper does not have; its
            # language models (Generator, Reasoner) do.
            names = {n for _, m in model.trainable_parts() for n in (getattr(m, "_no_split_modules", None) or ())}
            plugin.transformer_cls_names_to_wrap = sorted(names)
    elif engine == "deepspeed":
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        wanted = {"train_micro_batch_size_per_gpu": ("train.batch_size", args.batch_size),
                  "gradient_accumulation_steps": ("train.grad_accum", args.grad_accum),
                  "gradient_clipping": ("train.max_grad_norm", args.max_grad_norm)}
        for key, (name, value) in wanted.items():
            if ds.get(key, "auto") not in ("auto", value) and accelerator.is_main_process:
                print(f"flythinker: note: DeepSpeed {key} {ds[key]} replaced by {name} = {value} (the loop "
                      f"normalizes and accumulates by the train section)", file=sys.stderr, flush=True)
            ds[key] = value


def follow_schedule(scheduler: Any) -> None:
    """Set the optimizer's learning rates to the schedule's value at its current step. After a resume the restored
    optimizer state holds the rates of the schedule it was saved under; a resume that extends max_steps / epochs
    has another total, and its next step must already use the new schedule (as an uninterrupted run would)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
    groups = inner.optimizer.param_groups
    for group, base, f in zip(groups, inner.base_lrs, inner.lr_lambdas):
        group["lr"] = base * f(inner.last_epoch)
    inner._last_lr = [g["lr"] for g in groups]


def _backward_scale(accelerator: Any, wrapped: Any, engine: str) -> float:
    """The factor that cancels the division of the loss inside `accelerator.backward`: by accelerate's own
    gradient_accumulation_steps, or by DeepSpeed's (its engine scales every micro-batch by 1 / steps). The loop
    accumulates by windows itself, so that division would shrink every gradient."""
    if engine == "deepspeed":
        return float(wrapped.gradient_accumulation_steps())
    return float(accelerator.gradient_accumulation_steps)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (no memory): the module structure,
    configs, tokenizer and tied weights of the original, for `full_model` to fill later."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        # A model built under ZeRO-3's zero.Init holds empty slices; `ds_shape` is the parameter's full shape.
        empty = torch.empty(getattr(t, "ds_shape", t.shape), dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def full_model(skeleton: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `skeleton` (see `meta_copy`) holding `state_dict`'s tensors, with the skeleton's tied parameters
    tied again (assigning a state dict unties them). Raises RuntimeError when the state dict does not cover every
    parameter (a gathered state dict that is not whole)."""
    model = copy.deepcopy(skeleton)
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    model.load_state_dict(state_dict, strict=False, assign=True)
    for names in tied.values():
        present = [n for n in names if n in state_dict]
        if len(names) > 1 and present:
            keep = model.get_parameter(present[0])
            for n in names:
                owner, _, leaf = n.rpartition(".")
                model.get_submodule(owner)._parameters[leaf] = keep
    persistent = set(model.state_dict())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    missing = [n for n, t in tensors if t.is_meta and n in persistent]
    if missing:
        raise RuntimeError(f"the gathered state dict lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    return model


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


def _resumable_checkpoint(model: nn.Module, out_dir: Path, identity: dict[str, Any], accelerator: Any,
                          engine: str) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor] | None] | None:
    """The newest step-N of this run that reads back whole: (path, training state, weights to load; None under a
    sharded engine, whose `load_state` reads them). Unreadable ones are skipped (one note on stderr when an
    earlier one is used); another run's checkpoint, or one written under another engine, is refused; none usable
    while some exist is a UserError naming the newest bad file. Loads nothing into `model`."""
    skipped: list[CheckpointError] = []
    for _, ckpt in step_checkpoints(out_dir):
        try:
            state = load_training_state(ckpt)
        except CheckpointError as e:
            skipped.append(e)
            continue
        check_same_run(state.get("run"), identity, ckpt / STATE_NAME, out_dir)
        saved_engine = state.get("engine") or "ddp"
        if saved_engine != engine:
            raise UserError(f"train.out_dir {out_dir}: {ckpt.name} was written under the {saved_engine} engine and "
                            f"this run uses {engine}; resume it with the accelerate config it was trained with, "
                            f"or pass --train.overwrite true to start over")
        try:
            check_checkpoint_files(ckpt)
            if engine in SHARDED_ENGINES:
                check_engine_files(ckpt)
                weights = None
            else:
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


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a gradient (an FSDP2 DTensor's local shard; a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _grad_norms(model: nn.Module, accelerator: Any, sharded: bool) -> dict[str, float]:
    """L2 norm of each trainable part's gradient. Sharded: every process holds a disjoint shard, so the squared
    norms of the local shards are summed over processes (a collective); otherwise gradients are whole here."""
    parts = model.trainable_parts()
    local = []
    for _, module in parts:
        grads = [_local(p.grad).detach().float().norm() for p in module.parameters() if p.grad is not None]
        local.append(torch.stack(grads) if grads else None)
    if not sharded:
        return {name: float(g.norm()) for (name, _), g in zip(parts, local) if g is not None}
    device = accelerator.device
    sums = torch.stack([torch.zeros((), device=device) if g is None else g.square().sum().to(device) for g in local])
    present = torch.tensor([0.0 if g is None else 1.0 for g in local], device=device)
    sums = accelerator.reduce(sums, reduction="sum")
    present = accelerator.reduce(present, reduction="sum")
    return {name: float(s.sqrt()) for (name, _), s, n in zip(parts, sums, present) if n > 0}


def _clips_from_norms(accelerator: Any, sharded: bool) -> bool:
    """Whether `clip_to_norm` may clip from `_grad_norms`: gradients whole and final on this process (one process
    or DDP, whose backward already averaged them), not scaled by an fp16 GradScaler, not XLA's (whose gradients
    accelerate reduces inside its clip). Elsewhere accelerate's clip_grad_norm_ does it."""
    from accelerate.utils import DistributedType

    return not sharded and getattr(accelerator, "scaler", None) is None and \
        accelerator.distributed_type != DistributedType.XLA


def clip_to_norm(model: nn.Module, max_norm: float, grad_norms: dict[str, float]) -> None:
    """Scale the trainable parts' gradients so their global L2 norm is at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does, from the per-part norms `_grad_norms` has already taken: torch's call
    would read every gradient again for the norm, then multiply every gradient, by 1.0 when the norm is under
    the limit. Skipping that multiply changes nothing (x * 1.0 == x); the factor is torch's, max_norm / (norm + 1e-6)."""
    total = math.sqrt(sum(v * v for v in grad_norms.values()))
    if max_norm / (total + 1e-6) >= 1.0:
        return
    params = [p for _, module in model.trainable_parts() for p in module.parameters() if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(total))


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


def resolve_precision(precision: str) -> str:
    """"bf16" or "fp32": what train.precision means on this machine ("auto": bf16 where native, see
    `_native_bf16`). The run identity records this, not "auto"."""
    return "bf16" if precision == "bf16" or (precision == "auto" and _native_bf16()) else "fp32"


def _native_bf16() -> bool:
    """precision "auto": bf16 autocast (fp32 master weights and optimizer state) where the training device computes
    bf16 natively (`utils.native_bf16`: CUDA with bf16, AVX512-BF16 / AMX CPUs; $FLYTHINKER_NATIVE_BF16 overrides)."""
    from ..utils import default_device, native_bf16

    return native_bf16(default_device())


def _allow_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state whose mixed precision cannot change once set (a second Accelerator
    with another one raises); a process that trains twice with different precisions (study rows, tests) drops that
    state first. The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


@torch.no_grad()
def validate(model: nn.Module, features: Sequence[dict[str, Any]], pad_token_id: int, batch_size: int = 4) -> float:
    """Mean next-token NLL per supervised token over `features` (teacher-forced). `model` unwrapped (DDP:
    `accelerator.unwrap_model`); a model sharded in place by FSDP2 works too when every process calls this (its
    forward gathers the shards)."""
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
