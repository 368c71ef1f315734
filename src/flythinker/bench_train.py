"""`flythinker bench train`: seconds per optimizer step of SFT (Generator alone) vs FlyThinker (R + G), same batch.

The paper's training-cost claim (Section 4.3) is that FlyThinker costs about SFT plus one Reasoner forward/backward.
This measures both on identical input (warm-up first, then the median of several timed steps) and reports the
ratio next to the per-token FLOP ratio (C_G + C_R) / C_G, as a readable table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def count_matmul_params(lm: torch.nn.Module) -> int:
    """Parameters that take part in per-token matrix multiplies (the input embedding is a lookup, so excluded;
    a tied LM head is counted once as the output projection)."""
    emb = lm.get_input_embeddings().weight
    total = sum(p.numel() for p in lm.parameters() if p.ndim >= 2 and p is not emb)
    head = lm.get_output_embeddings()
    if head is not None and head.weight is emb:
        total += emb.numel()
    return total


def flop_ratio(generator: torch.nn.Module, reasoner: torch.nn.Module) -> float:
    """(C_G + C_R) / C_G per token; the Reasoner runs without its LM head, so its head is not counted."""
    c_g = count_matmul_params(generator)
    c_r = count_matmul_params(reasoner)
    head = reasoner.get_output_embeddings()
    if head is not None:
        c_r -= head.weight.numel()
    return (c_g + c_r) / c_g


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
    if kind == "tiny":
        from .tiny import tiny_lm

        return tiny_lm("llama", seed=1, num_layers=4, hidden_size=64, intermediate_size=128), \
            tiny_lm("llama", seed=2, num_layers=1, hidden_size=64, intermediate_size=128)
    if kind == "medium":
        from .bench import medium_models

        return medium_models()
    if kind == "default":
        from .defaults import load_default_models

        g, r, _ = load_default_models()
        return g, r
    raise ValueError(f"unknown --model {kind!r}; valid: tiny, medium, default")


def run(model_kind: str, tokens: int, batch_size: int, steps: int, warmup: int, threads: int) -> dict:
    from .model import FlyThinker

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gen, rea = _models(model_kind)
    V = gen.get_input_embeddings().num_embeddings
    ids = torch.randint(3, min(V, 30000), (batch_size, tokens))
    labels = ids.clone()
    labels[:, : tokens // 2] = -100  # half prompt, half response, like a profile+query -> response example
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rows = {}
    for name, model in (("sft", FlyThinker(gen, None)), ("flythinker", FlyThinker(gen, rea))):
        rows[name] = statistics.median(time_train_steps(model, batch, steps, warmup))
    return {"model": model_kind, "tokens": tokens, "batch": batch_size, "threads": threads,
            "sft_s_per_step": rows["sft"], "flythinker_s_per_step": rows["flythinker"],
            "ratio_flythinker_over_sft": rows["flythinker"] / rows["sft"], "flop_ratio": flop_ratio(gen, rea),
            "device": "cpu"}


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="medium", choices=["tiny", "medium", "default"])
    parser.add_argument("--tokens", type=int, default=512, help="sequence length (default 512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from .utils import set_threads

    threads = set_threads(args.threads or None)
    res = run(args.model, args.tokens, args.batch, args.steps, args.warmup, threads)
    print(f"{'method':<12}{'s/step':>10}")
    print(f"{'sft':<12}{res['sft_s_per_step']:>10.3f}")
    print(f"{'flythinker':<12}{res['flythinker_s_per_step']:>10.3f}")
    print(f"ratio {res['ratio_flythinker_over_sft']:.3f} (flop ratio {res['flop_ratio']:.3f})")
    print(json.dumps(res, sort_keys=True))
    return 0
