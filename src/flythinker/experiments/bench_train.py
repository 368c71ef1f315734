"""`flythinker bench train`: seconds per optimizer step of SFT (Generator alone) vs FlyThinker (R + G), same batch,
at each training precision (fp32, and bf16 autocast with fp32 master weights and optimizer state: what
`train.precision` bf16 / auto-on-native-hardware runs).

The paper's training-cost claim (Section 4.3) is that FlyThinker costs about SFT plus one Reasoner forward/backward.
This measures both on identical input (warm-up first, then the median of several timed steps; every (precision,
method) configuration is timed round-robin, so background load hits all alike) and reports the ratio next to the
per-token FLOP ratio (C_G + C_R) / C_G (`flythinker.flops`, the one counter), and per method the bf16 / fp32 ratio.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..methods.base import ModelArgs
from ..utils import UserError, native_bf16

PRECISIONS = ("fp32", "bf16")


def default_precisions(device: torch.device | str = "cpu") -> list[str]:
    """fp32, plus bf16 where `device` computes bf16 natively (`utils.native_bf16`): both sides of the choice
    train.precision auto makes there."""
    return ["fp32", "bf16"] if native_bf16(device) else ["fp32"]


def precision_autocast(precision: str, device_type: str):
    """bf16: autocast around the forward (weights, gradients and optimizer state stay fp32), as accelerate's
    mixed_precision="bf16" does in `fit`; fp32: nothing."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_optimizer(params, lr: float, impl: str = "auto", device: torch.device | str = "cpu"):
    """The AdamW a training run builds (`training.optim.build_optimizer`: the run's betas / eps, computed by
    `train.optimizer_impl` `impl` resolved for `device`), over `params` at one learning rate."""
    from ..training.optim import build_optimizer, resolve_optimizer_impl

    return build_optimizer([{"params": list(params), "lr": lr}], resolve_optimizer_impl(impl, device))


def train_step(model, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer, precision: str = "fp32") -> float:
    """One optimizer step (forward under `precision`, backward, AdamW); returns the loss."""
    with precision_autocast(precision, batch["input_ids"].device.type):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return float(out.loss.detach())


def time_train_steps(model, batch: dict[str, torch.Tensor], steps: int, warmup: int,
                     precision: str = "fp32") -> list[float]:
    """Seconds per optimizer step (forward + backward + AdamW) on a fixed batch."""
    return time_train_configs([(model, precision)], batch, steps, warmup)[0]


def time_train_configs(configs: list[tuple[torch.nn.Module, str]], batch: dict[str, torch.Tensor], steps: int,
                       warmup: int, optimizer_impl: str = "auto") -> list[list[float]]:
    """Seconds per optimizer step of each (model, precision), timed round-robin (step i of every configuration,
    then step i + 1, ...). Models that are the same object share one AdamW (its state is fp32 at any precision)."""
    opts: dict[int, torch.optim.Optimizer] = {}
    for model, _ in configs:
        if id(model) not in opts:
            opts[id(model)] = bench_optimizer((p for p in model.parameters() if p.requires_grad), 1e-6,
                                              optimizer_impl, batch["input_ids"].device)
        model.train()
    times: list[list[float]] = [[] for _ in configs]
    for i in range(warmup + steps):
        for k, (model, precision) in enumerate(configs):
            t0 = time.perf_counter()
            train_step(model, batch, opts[id(model)], precision)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def _loss(model, batch: dict[str, torch.Tensor], precision: str) -> float:
    """The batch's loss under `precision` (no update): how far bf16 autocast moves it from fp32."""
    with precision_autocast(precision, batch["input_ids"].device.type):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return float(out.loss)


def _models(kind: str):
    from ..testing import medium_models, tiny_lm

    if kind == "tiny":
        return tiny_lm("llama", seed=1, num_layers=4, hidden_size=64, intermediate_size=128), \
            tiny_lm("llama", seed=2, num_layers=1, hidden_size=64, intermediate_size=128)
    if kind == "medium":
        g, r, _ = medium_models()
        return g, r
    if kind == "default":
        from ..models import load_default_models

        g, r, _ = load_default_models()
        return g, r
    raise ValueError(f"unknown --model {kind!r}; valid: tiny, medium, default")


def run(model_kind: str, tokens: int, batch_size: int, steps: int, warmup: int, threads: int,
        precisions: list[str] | None = None, optimizer_impl: str = "auto") -> dict:
    """Time SFT and FlyThinker at each precision (None: `default_precisions`), AdamW computed by `optimizer_impl`
    (`TrainBenchConfig.optimizer_impl`). The top-level figures are the first
    precision's; `by_precision` holds every precision's, `bf16_over_fp32` the per-method ratio when both ran."""
    from ..methods.flythinker.decode import per_token_macs
    from ..methods.flythinker.model import FlyThinker
    from ..training.optim import resolve_optimizer_impl

    precisions = list(precisions or default_precisions("cpu"))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gen, rea = _models(model_kind)
    V = gen.get_input_embeddings().num_embeddings
    ids = torch.randint(3, min(V, 30000), (batch_size, tokens))
    labels = ids.clone()
    labels[:, : tokens // 2] = -100  # half prompt, half response, like a profile+query -> response example
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    fly = FlyThinker(gen, rea)
    models = {"sft": FlyThinker(gen, None), "flythinker": fly}
    # Losses before any update, on the same weights: the bf16 forward's distance from the fp32 one.
    losses = {(p, name): _loss(m, batch, p) for p in precisions for name, m in models.items()}
    configs = [(p, name) for p in precisions for name in models]
    timed = time_train_configs([(models[name], p) for p, name in configs], batch, steps, warmup, optimizer_impl)
    s = {key: statistics.median(t) for key, t in zip(configs, timed)}
    by_precision = {p: {"sft_s_per_step": s[p, "sft"], "flythinker_s_per_step": s[p, "flythinker"],
                        "ratio_flythinker_over_sft": s[p, "flythinker"] / s[p, "sft"],
                        "sft_loss": losses[p, "sft"], "flythinker_loss": losses[p, "flythinker"]}
                    for p in precisions}
    c_g, c_r = per_token_macs(fly)
    first = by_precision[precisions[0]]
    res = {"model": model_kind, "tokens": tokens, "batch": batch_size, "threads": threads,
           "sft_s_per_step": first["sft_s_per_step"], "flythinker_s_per_step": first["flythinker_s_per_step"],
           "ratio_flythinker_over_sft": first["ratio_flythinker_over_sft"], "flop_ratio": (c_g + c_r) / c_g,
           "precision": precisions[0], "precisions": precisions, "by_precision": by_precision,
           "weights_dtype": "float32", "native_bf16": native_bf16("cpu"), "device": "cpu",
           "optimizer_impl": resolve_optimizer_impl(optimizer_impl, "cpu")}
    if "fp32" in precisions and "bf16" in precisions:
        res["bf16_over_fp32"] = {name: s["bf16", name] / s["fp32", name] for name in models}
    return res


@dataclass
class TrainBenchConfig:
    """`flythinker bench train` settings."""

    model: Literal["tiny", "medium", "default"] = "medium"
    """tiny: the test models; medium: random ~200M + ~57M Llama pair; default: the embedded pretrained models."""
    tokens: int = 512
    """Sequence length (half prompt, half response)."""
    batch: int = 1
    steps: int = 3
    """Timed steps (median reported)."""
    warmup: int = 1
    threads: int = 0
    """torch threads (0 = all cores)."""
    precision: list[Literal["fp32", "bf16"]] = field(default_factory=list)
    """Training precisions to time, interleaved (comma-separated): fp32, bf16 (autocast; weights and AdamW state
    stay fp32). Empty: fp32, plus bf16 where this CPU computes it natively (`flythinker.utils.native_bf16`)."""
    methods: list[str] = field(default_factory=list)
    """Registered methods to compare instead (e.g. sft,flythinker,cot,coconut,interleaved): seconds per step and
    per epoch of a fixed dataset (`examples`), ratios to SFT, memory (bench_methods.py)."""
    examples: int = 4
    """With methods: examples in the fixed dataset (one per step); `steps` is then the number of timed epochs."""
    plot: str = ""
    """With methods: also write the Fig. 3-style PNG here."""
    method_args: ModelArgs = field(default_factory=ModelArgs)
    """With methods: the method settings every method is built with, as `--model.*` in train/study (e.g.
    --method_args.coconut.latents 16, --method_args.cot.max_reasoning_tokens 64, --method_args.fusion.lam 0.2);
    its generator / reasoner / method fields are not used (`--model` picks the models)."""
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """How AdamW computes its step, as `train.optimizer_impl` (auto: fused where torch has the kernel, as training
    runs; for-loop: torch's per-parameter default on CPU, what the benches timed before fused became the default)."""

    def __post_init__(self) -> None:
        if self.tokens < 2 or self.batch < 1 or self.steps < 1 or self.warmup < 0 or self.threads < 0:
            raise UserError("bench train: --tokens >= 2, --batch >= 1, --steps >= 1, --warmup >= 0, --threads >= 0")
        bad = [x for x in self.precision if x not in PRECISIONS]
        if bad:
            raise UserError(f"bench train: --precision must be fp32 and/or bf16; got {','.join(map(str, bad))}")
        if len(set(self.precision)) != len(self.precision):
            raise UserError(f"bench train: --precision lists a precision twice: {','.join(self.precision)}")
