"""`flythinker bench train`: seconds per optimizer step of SFT (Generator alone) vs FlyThinker (R + G), same batch.

The paper's training-cost claim (Section 4.3) is that FlyThinker costs about SFT plus one Reasoner forward/backward.
This measures both on identical input (warm-up first, then the median of several timed steps) and reports the
ratio next to the per-token FLOP ratio (C_G + C_R) / C_G (`flythinker.flops`, the one counter).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..utils import UserError


def time_train_steps(model, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> list[float]:
    """Seconds per optimizer step (forward + backward + AdamW) on a fixed batch."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


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


def run(model_kind: str, tokens: int, batch_size: int, steps: int, warmup: int, threads: int) -> dict:
    from ..methods.flythinker.decode import per_token_macs
    from ..methods.flythinker.model import FlyThinker

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gen, rea = _models(model_kind)
    V = gen.get_input_embeddings().num_embeddings
    ids = torch.randint(3, min(V, 30000), (batch_size, tokens))
    labels = ids.clone()
    labels[:, : tokens // 2] = -100  # half prompt, half response, like a profile+query -> response example
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rows = {}
    fly = FlyThinker(gen, rea)
    for name, model in (("sft", FlyThinker(gen, None)), ("flythinker", fly)):
        rows[name] = statistics.median(time_train_steps(model, batch, steps, warmup))
    c_g, c_r = per_token_macs(fly)
    return {"model": model_kind, "tokens": tokens, "batch": batch_size, "threads": threads,
            "sft_s_per_step": rows["sft"], "flythinker_s_per_step": rows["flythinker"],
            "ratio_flythinker_over_sft": rows["flythinker"] / rows["sft"], "flop_ratio": (c_g + c_r) / c_g,
            "device": "cpu"}


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
    methods: list[str] = field(default_factory=list)
    """Registered methods to compare instead (e.g. sft,flythinker,cot,coconut,interleaved): seconds per step and
    per epoch of a fixed dataset (`examples`), ratios to SFT, memory (bench_methods.py)."""
    examples: int = 4
    """With methods: examples in the fixed dataset (one per step); `steps` is then the number of timed epochs."""
    plot: str = ""
    """With methods: also write the Fig. 3-style PNG here."""

    def __post_init__(self) -> None:
        if self.tokens < 2 or self.batch < 1 or self.steps < 1 or self.warmup < 0 or self.threads < 0:
            raise UserError("bench train: --tokens >= 2, --batch >= 1, --steps >= 1, --warmup >= 0, --threads >= 0")
