"""Joint training of Generator + Reasoner (paper Algorithm 1, Eq. 7-9), and the SFT baseline through the same loop.

Owns: the optimizer (AdamW with one parameter group per sub-model), the warmup+decay schedule, the training loop
(`fit`: gradient accumulation normalised by supervised-token count across the window and all processes, clipping,
autocast, JSONL loss log, progress bar, periodic atomic checkpoints, exact `--resume`), `validate`, model set-up
(`build_model`: optional freezing / LoRA / gradient checkpointing), and the `flythinker train` verb.
Runs single-process on CPU/GPU and under `accelerate launch` (DDP) unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_training_state, prune_checkpoints, rng_state, save_checkpoint, \
    set_rng_state
from .config import FlyThinkerConfig, Normalize, Scope, WidthMode, to_dict
from .data import DataConfig
from .model import IGNORE_INDEX, FlyThinker
from .utils import UserError, seed_everything

Method = Literal["flythinker", "sft"]


@dataclass
class ModelArgs:
    """Which models to train and how they are fused."""

    method: Method = "flythinker"
    """"flythinker" (Generator + Reasoner) or "sft" (the Generator alone: the paper's SFT baseline)."""
    generator: str = "default"
    """"default" (embedded SmolLM2-135M-Instruct), a local model directory, or a hub id."""
    reasoner: str = "default"
    """"default" (first k layers of the Generator, k = flythinker.defaults.DEFAULT_REASONER_LAYERS), an integer k,
    a local model directory or hub id, or "none"."""
    lam: float = 0.5
    """λ, fusion strength."""
    scope: Scope = "global"
    """Where fusion applies: global | input | output."""
    width_mode: WidthMode = "project"
    """d_R != d_G handling: project (learned, initialised to zero-pad) | pad (official)."""
    rescale: bool = True
    """Rescale r to the Generator's mean embedding norm before adding."""
    normalize: Normalize = "none"
    """none (paper) | center | standardize: r minus the untrained Reasoner's mean state (and / std) before the
    rescale; statistics from the first `calibration_examples` training examples."""
    freeze_generator: bool = False
    """Keep the Generator's weights fixed."""
    freeze_reasoner: bool = False
    """Keep the Reasoner's weights fixed."""
    lora_generator: bool = False
    """Train LoRA adapters on the Generator instead of all its weights (needs peft)."""
    lora_reasoner: bool = False
    """Train LoRA adapters on the Reasoner instead of all its weights (needs peft)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    def fusion_config(self) -> FlyThinkerConfig:
        return FlyThinkerConfig(lam=self.lam, scope=self.scope, width_mode=self.width_mode, rescale=self.rescale,
                                normalize=self.normalize)


@dataclass
class TrainArgs:
    """Optimisation and bookkeeping."""

    out_dir: str = "out/train"
    """Where checkpoints (step-N/, final/) and the loss log (log.jsonl) go."""
    lr_generator: float = 5e-5
    """Peak learning rate of the Generator."""
    lr_reasoner: float = 5e-5
    """Peak learning rate of the Reasoner."""
    lr_projection: float = 1e-3
    """Peak learning rate of the width projection (only when d_R != d_G)."""
    weight_decay: float = 0.025
    """AdamW weight decay on matrices (not on norms/biases); the official scripts use 0.025."""
    warmup_ratio: float = 0.05
    """Fraction of optimizer steps spent in linear warmup."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = derived from epochs."""
    batch_size: int = 1
    """Examples per micro-batch per process."""
    grad_accum: int = 8
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast where the device supports it natively (CUDA), fp32 elsewhere."""
    seed: int = 0
    """Seeds data order, dropout and initialisation."""
    log_every: int = 1
    """Write a loss-log line every N optimizer steps."""
    save_every: int = 0
    """Save a resumable step-N checkpoint every N optimizer steps (0 = only final/)."""
    keep_checkpoints: int = 2
    """How many step-N checkpoints to keep (0 = all)."""
    save_final: bool = True
    """Write out_dir/final/ at the end."""
    resume: bool = False
    """Continue from the newest complete step-N checkpoint in out_dir."""
    calibration_examples: int = 32
    """Training examples whose Reasoner states set the statistics of model.normalize (center/standardize)."""
    threads: int = 0
    """torch intra-op threads (0 = all cores available to this process)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise UserError("train.batch_size and train.grad_accum must be >= 1")
        if self.epochs < 1 and self.max_steps < 1:
            raise UserError("set train.epochs >= 1 or train.max_steps >= 1")


# ----------------------------------------------------------------------------------------------------------------
# model set-up


def build_model(generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs, tokenizer: Any = None) -> FlyThinker:
    """Wrap the two LMs per `args`: SFT drops the Reasoner; optional freezing, LoRA, gradient checkpointing."""
    if args.method == "sft":
        reasoner = None
    if reasoner is not None:
        _freeze_unused_reasoner_head(reasoner)
    if args.lora_generator:
        generator = _lora(generator, args)
    if reasoner is not None and args.lora_reasoner:
        reasoner = _lora(reasoner, args)
    if args.freeze_generator:
        generator.requires_grad_(False)
    if reasoner is not None and args.freeze_reasoner:
        reasoner.requires_grad_(False)
    if args.gradient_checkpointing:
        for lm in (generator, reasoner):
            if lm is not None:
                # transformers 5.x renamed the API (the old name warns, and goes in v6); older releases lack the new one.
                if hasattr(lm, "activation_checkpointing_enable"):
                    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                lm.config.use_cache = False
    return FlyThinker(generator, reasoner, args.fusion_config(), tokenizer=tokenizer)


def _freeze_unused_reasoner_head(reasoner: nn.Module) -> None:
    """FlyThinker reads the Reasoner's final hidden state, never its LM head: an untied head would get no gradient
    (and break DDP's unused-parameter check), so it is frozen. A tied head is the input embedding and stays."""
    out, inp = reasoner.get_output_embeddings(), reasoner.get_input_embeddings()
    if out is not None and out.weight is not inp.weight:
        out.requires_grad_(False)


def _lora(lm: nn.Module, args: ModelArgs) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'flythinker[peft]'") from None
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(lm, cfg)


def param_groups(model: FlyThinker, args: TrainArgs) -> list[dict[str, Any]]:
    """One AdamW group per (sub-model, decay/no-decay); norms and biases are not decayed."""
    groups = []
    parts = [("generator", model.generator, args.lr_generator), ("reasoner", model.reasoner, args.lr_reasoner),
             ("projection", model.projection, args.lr_projection)]
    for name, module, lr in parts:
        if module is None:
            continue
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


# ----------------------------------------------------------------------------------------------------------------
# data order (deterministic, shardable, resumable)


def collate_features(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad pre-encoded features ({"input_ids", "labels"} lists, or {"prompt_ids","response_ids"})."""
    rows = []
    for f in features:
        if "input_ids" in f:
            rows.append((list(f["input_ids"]), list(f["labels"])))
        else:
            p, r = list(f["prompt_ids"]), list(f["response_ids"])
            rows.append((p + r, [IGNORE_INDEX] * len(p) + r))
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def calibrate_fusion(model: FlyThinker, features: Sequence[dict[str, Any]], n_examples: int,
                     pad_token_id: int) -> int:
    """Set the Reasoner statistics that config.normalize needs from the first `n_examples` features (untrained R,
    one example per pass, no padding). A no-op (returns 0) when not needed or already set, e.g. on resume."""
    if model.reasoner is None or model.config.normalize == "none" or model.calibrated:
        return 0
    if n_examples < 1:
        raise UserError("train.calibration_examples must be >= 1 when normalize is center or standardize")
    device = next(model.reasoner.parameters()).device
    batches = ((b["input_ids"].to(device), b["attention_mask"].to(device))
               for b in (collate_features([f], pad_token_id) for f in features[:n_examples]))
    return model.calibrate(batches)


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


# ----------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class FitResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float = 0.0
    final_dir: Path | None = None


def fit(model: FlyThinker, features: Sequence[dict[str, Any]], args: TrainArgs, pad_token_id: int,
        config: dict[str, Any] | None = None, accelerator: Any = None) -> FitResult:
    """Train `model` on pre-encoded `features` (see `collate_features`). Returns per-step losses and timing.

    Loss normalisation: within an optimizer window (grad_accum micro-batches x all processes) every supervised
    token weighs the same, i.e. loss = Σ NLL / Σ tokens over the window, not a mean of per-batch means.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if not features:
        raise UserError("no training examples")
    if accelerator is None:
        mp = "bf16" if args.precision == "bf16" or (args.precision == "auto" and _native_bf16()) else "no"
        accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    out_dir = Path(args.out_dir)
    config = config or {"train": to_dict(args)}

    seed_everything(args.seed)
    # Before any weight is loaded or updated: the statistics come from the untrained Reasoner, so a resumed run
    # recomputes exactly the values it started with.
    calibrate_fusion(model, features, args.calibration_examples, pad_token_id)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, args), betas=(0.9, 0.95), eps=1e-8)
    total = total_optimizer_steps(len(features), args, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total))

    step, epoch, window = 0, 0, 0
    if args.resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is not None:
            state = load_training_state(ckpt)
            _load_weights_into(model, ckpt, state)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
            step, epoch, window = state["step"], state["epoch"], state["window"]
            accelerator.print(f"resumed from {ckpt} at step {step}")
    wrapped = accelerator.prepare(model)
    device = accelerator.device

    log_path = out_dir / "log.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume and log_path.exists():
            log_path.unlink()
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

    for e, w, win in windows():
        if step >= total:
            break
        t0 = time.perf_counter()
        batches = [collate_features([features[i] for i in micro[rank * args.batch_size:(rank + 1) * args.batch_size]],
                                    pad_token_id) for micro in win]
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        window_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=device), reduction="sum"))
        loss_sum_local = torch.zeros((), device=device)
        for j, b in enumerate(batches):
            b = {k: v.to(device) for k, v in b.items()}
            sync = j == len(batches) - 1
            ctx = accelerator.no_sync(wrapped) if (world > 1 and not sync) else _nullcontext()
            with ctx, accelerator.autocast():
                out = wrapped(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                # DDP averages gradients over processes, so scale by world to make the result Σ NLL / Σ tokens.
                loss = out.loss_sum * world / max(1, window_tokens)
            accelerator.backward(loss)
            loss_sum_local += out.loss_sum.detach().float()
        grad_norms = _grad_norms(model)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = float(accelerator.reduce(loss_sum_local, reduction="sum")) / max(1, window_tokens)
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
                     "step": step, "epoch": next_e, "window": next_w, "trainable": _lora_state(model)}
            if accelerator.is_main_process:
                save_checkpoint(out_dir, f"step-{step:06d}", accelerator.unwrap_model(wrapped), state, config)
                prune_checkpoints(out_dir, args.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()
    elapsed = time.perf_counter() - t_start
    result.steps = step
    result.seconds_per_step = elapsed / max(1, len(result.losses))
    if args.save_final and accelerator.is_main_process:
        result.final_dir = save_checkpoint(out_dir, "final", accelerator.unwrap_model(wrapped), None, config)
    accelerator.wait_for_everyone()
    model.eval()
    return result


def _next_position(e: int, w: int, n: int, args: TrainArgs, world: int) -> tuple[int, int]:
    n_windows = len(windows_for_epoch(n, e, args, world))
    return (e, w + 1) if w + 1 < n_windows else (e + 1, 0)


def _grad_norms(model: FlyThinker) -> dict[str, float]:
    out = {}
    for name in ("generator", "reasoner", "projection"):
        module = getattr(model, name)
        if module is None:
            continue
        grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
        if grads:
            out[name] = float(torch.stack(grads).norm())
    return out


def _lora_state(model: FlyThinker) -> dict[str, torch.Tensor] | None:
    """With LoRA the step directory holds merged weights; the adapters themselves are kept for exact resume."""
    if not any(hasattr(m, "merge_and_unload") for m in (model.generator, model.reasoner) if m is not None):
        return None
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def _load_weights_into(model: FlyThinker, ckpt: Path, state: dict[str, Any]) -> None:
    """Restore trained weights into the freshly built `model` (same architecture/LoRA set-up as when saved)."""
    if state.get("trainable") is not None:
        missing = model.load_state_dict(state["trainable"], strict=False).unexpected_keys
        if missing:
            raise UserError(f"{ckpt}: checkpoint does not match the model set-up ({missing[:2]})")
        return
    saved = FlyThinker.from_pretrained(ckpt, load_tokenizer=False)
    model.load_state_dict(saved.state_dict())


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _native_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@torch.no_grad()
def validate(model: FlyThinker, features: Sequence[dict[str, Any]], pad_token_id: int, batch_size: int = 4) -> float:
    """Mean next-token NLL per supervised token over `features` (teacher-forced)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(features), batch_size):
        b = {k: v.to(device) for k, v in collate_features(features[i: i + batch_size], pad_token_id).items()}
        out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        total += float(out.loss_sum)
        n += int(out.n_tokens)
    model.train(was_training)
    return total / max(1, n)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    from .config import add_dataclass_args

    parser.add_argument("--config", help="YAML file with model/data/train sections (flags override it)")
    add_dataclass_args(parser, TrainConfig)
    parser.set_defaults(func=_cli_main)


def _cli_main(args: argparse.Namespace) -> int:
    from .config import build_config

    cfg = build_config(TrainConfig, args, args.config)
    run_training(cfg)
    return 0


def run_training(cfg: "TrainConfig") -> FitResult:
    """What `flythinker train` does: load models and data, encode, fit, save final/."""
    from .data import encode_example, load_examples
    from .defaults import load_models
    from .utils import print0, set_threads

    set_threads(cfg.train.threads or None)
    if not cfg.train_data:
        raise UserError("train_data is required (a .jsonl/.jsonl.gz file or a LongLaMP file/directory)")
    examples = load_examples(cfg.train_data, task=cfg.data.task)
    if cfg.limit > 0:
        examples = examples[: cfg.limit]
    reasoner_spec = "none" if cfg.model.method == "sft" else cfg.model.reasoner
    generator, reasoner, tokenizer = load_models(cfg.model.generator, reasoner_spec)
    seed_everything(cfg.train.seed)
    model = build_model(generator, reasoner, cfg.model, tokenizer)
    features = [encode_example(ex, tokenizer, cfg.data, with_response=True) for ex in examples]
    print0(f"training {cfg.model.method} on {len(features)} examples from {cfg.train_data}")
    result = fit(model, features, cfg.train, tokenizer.pad_token_id, config=to_dict(cfg))
    if result.final_dir is not None:
        print0(f"saved {result.final_dir}")
    return result


@dataclass
class TrainConfig:
    """`flythinker train` configuration: model, data and train sections plus the data files."""

    train_data: str = ""
    """Training examples (generic .jsonl/.jsonl.gz, or LongLaMP json/jsonl/parquet)."""
    limit: int = 0
    """Use only the first N training examples (0 = all)."""
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainArgs = field(default_factory=TrainArgs)

