"""`flythinker bench`: benchmarks that print a readable table and end with one JSON line.

Owns `bench decode` (prefill time and ms per new token of SFT, FlyThinker sequential and FlyThinker concurrent,
compared per device and on the same machine) and the lazy dispatch of `bench train` to `flythinker.bench_train`,
which is imported only when `bench train` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .utils import UserError

MODELS = ("medium", "tiny", "default")


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    d = sub.add_parser(
        "decode", help="ms per new token: SFT vs FlyThinker sequential vs concurrent",
        description="Decode latency of the Generator alone (SFT), FlyThinker sequential and FlyThinker with the "
                    "Reasoner running concurrently, at each batch size. Two comparisons: per device (each model "
                    "gets the same compute, the paper's setting: here the same number of cores per model) and same "
                    "machine (each method in its fastest configuration using all cores). Prints a table, then one "
                    "JSON line.")
    d.add_argument("--model", choices=MODELS, default="medium",
                   help="medium: random ~200M Llama Generator + ~55M Reasoner (vocab 49152); tiny: the test models; "
                        "default: the embedded pretrained models (flythinker.defaults)")
    d.add_argument("--prompt-tokens", type=int, default=512, help="prompt length per row (default 512)")
    d.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32, >= 2)")
    d.add_argument("--batch", type=_int_list, default=[1, 8], help="comma-separated batch sizes (default 1,8)")
    d.add_argument("--runs", type=int, default=3, help="timed runs per configuration (default 3): prefill is the median over runs, "
                        "ms/token the median over every decode step of every run")
    d.add_argument("--threads", type=int, default=None,
                   help="CPU cores the benchmark may use (default: all this process may run on)")
    d.add_argument("--lam", type=float, default=0.5, help="λ of the FlyThinker model (default 0.5)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.set_defaults(func=run_decode)
    # `bench train` belongs to flythinker.bench_train. Its flags are unknown until that module is imported, so this
    # placeholder swallows everything after `train` (prefix_chars that no flag uses) and parses it on dispatch.
    t = sub.add_parser("train", add_help=False, prefix_chars="\x00", help="training step time (flythinker.bench_train)")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=_run_train)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _run_train(args: argparse.Namespace) -> int:
    import importlib

    try:
        module = importlib.import_module("flythinker.bench_train")
    except ModuleNotFoundError as e:
        if e.name not in ("flythinker.bench_train", None):
            raise
        raise UserError("`bench train` is not available in this installation (no flythinker.bench_train)") from None
    parser = argparse.ArgumentParser(prog="flythinker bench train")
    module.add_cli(parser)
    ns = parser.parse_args(args.rest)
    return ns.func(ns)


# ----------------------------------------------------------------------------------------------------------------
# models


def medium_models(seed: int = 0):
    """Random Llama models at realistic sizes: a ~200M-parameter Generator (SmolLM2-like vocabulary of 49152,
    width 768, 26 layers) and a ~57M Reasoner (width 512, 10 layers; different width, so the projection runs)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    common = {"vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_theta": 100000.0,
                  "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    g_cfg = LlamaConfig(hidden_size=768, num_hidden_layers=26, num_attention_heads=12, num_key_value_heads=4,
                        intermediate_size=2048, **common)
    r_cfg = LlamaConfig(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=1536, **common)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        g = AutoModelForCausalLM.from_config(g_cfg)
        r = AutoModelForCausalLM.from_config(r_cfg)
    return g.eval(), r.eval(), None


def _load(name: str):
    if name == "medium":
        return medium_models()
    if name == "tiny":
        from .tiny import tiny_lm, tiny_tokenizer

        return tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1), tiny_tokenizer()
    try:
        from .defaults import load_default_models
    except ImportError as e:
        raise UserError(f"--model default needs flythinker.defaults ({e})") from None
    return load_default_models(reasoner_layers=None)


# ----------------------------------------------------------------------------------------------------------------
# timing


@dataclass
class Row:
    batch: int
    method: str              # sft | sequential | concurrent
    threads: str             # "2" (one pool), "1+1" (Generator + Reasoner pools), "gpu"
    backend: str
    prefill_ms: float
    decode_ms: float         # per decode step = per new token of each row

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "method": self.method, "threads": self.threads, "backend": self.backend,
                "prefill_ms": round(self.prefill_ms, 3), "decode_ms": round(self.decode_ms, 3),
                "tokens_per_s": round(1000.0 * self.batch / self.decode_ms, 2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model, ids: torch.Tensor, new_tokens: int,
                    kw: dict[str, Any] | None = None) -> tuple[float, list[float]]:
    """One timed generation of an unpadded batch `ids` (B, T): (prefill ms = prompt in -> first token out, ms of
    each later decode step). EOS is disabled so every run decodes `new_tokens` tokens; exactly one generation is
    inside the timed window. `kw` goes to `generation.stream` (backend, thread split). The one timing primitive
    of the project: `bench decode` and the study's efficiency figures both use it."""
    from .generation import stream

    kw = kw or {}
    mask = torch.ones_like(ids)
    _sync(ids.device)
    t0 = time.perf_counter()
    it = stream(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=[], **kw)
    next(it)
    _sync(ids.device)
    marks = [time.perf_counter()]
    for _ in it:
        _sync(ids.device)
        marks.append(time.perf_counter())
    return (marks[0] - t0) * 1e3, [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def time_configs(configs: list[tuple[Any, int | None, dict[str, Any]]], ids: torch.Tensor | Sequence[torch.Tensor],
                 new_tokens: int, runs: int) -> list[tuple[float, float]]:
    """(median prefill ms over runs, median ms of one decode step over all steps of all runs) per configuration
    (model, main-thread count, decode kwargs). `ids` is one prompt batch for all, or one per configuration.

    Robust to a shared machine: runs are interleaved (run 1 of every configuration, then run 2, ...) so background
    load hits all configurations alike, and the per-token figure is the median over every decode step rather than
    a per-run mean, so a burst of contention that stalls a few steps does not move it. Each configuration first
    decodes a short warm-up (allocator, OpenMP teams, the Reasoner's worker thread)."""
    from .generation import pinned_threads

    per = list(ids) if not isinstance(ids, torch.Tensor) else [ids] * len(configs)
    if len(per) != len(configs):
        raise ValueError(f"{len(per)} prompt batches for {len(configs)} configurations")
    for (model, threads, kw), x in zip(configs, per):
        with pinned_threads(threads):
            time_generation(model, x[:, -min(x.shape[1], 16):], 3, kw)
    prefill: list[list[float]] = [[] for _ in configs]
    steps: list[list[float]] = [[] for _ in configs]
    for _ in range(runs):
        for i, (model, threads, kw) in enumerate(configs):
            with pinned_threads(threads):
                pre, dec = time_generation(model, per[i], new_tokens, kw)
            prefill[i].append(pre)
            steps[i].extend(dec)
    return [(statistics.median(p), statistics.median(d)) for p, d in zip(prefill, steps)]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _params(lm) -> int:
    return sum(p.numel() for p in lm.parameters())


def run_decode(args: argparse.Namespace) -> int:
    from . import FlyThinker, FlyThinkerConfig
    from .__main__ import print_json_line
    from .generation import per_token_macs, resolve_backend

    if args.new_tokens < 2:
        raise UserError("--new-tokens must be >= 2 (one token comes from the prefill)")
    if args.prompt_tokens < 1 or args.runs < 1:
        raise UserError("--prompt-tokens and --runs must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    n = args.threads or _cores()
    if n < 1:
        raise UserError("--threads must be >= 1")
    k = max(1, n // 2)  # per-device comparison: each model gets k cores (one each on a 2-core machine)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    generator, reasoner, tokenizer = _load(args.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator.to(device=device, dtype=dtype)
    reasoner.to(device=device, dtype=dtype)
    fly = FlyThinker(generator, reasoner, FlyThinkerConfig(lam=args.lam)).eval()
    sft = FlyThinker(generator, None).eval()
    limit = getattr(generator.config, "max_position_embeddings", None)
    if limit is not None and args.prompt_tokens + args.new_tokens > limit:
        raise UserError(f"--prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} exceeds the "
                        f"model's context of {limit}")
    vocab = len(tokenizer) if tokenizer is not None else generator.get_input_embeddings().num_embeddings
    context = args.prompt_tokens + args.new_tokens // 2  # mean cache length while decoding
    c_g, c_r = per_token_macs(fly, context)
    flop_ratio = (c_g + c_r) / c_g

    # (comparison, method, model, backend, label, main threads, (G, R) threads); each distinct one measured once.
    plans: list[tuple[str, str, Any, str, str, int | None, tuple[int, int] | None]] = []
    if device.type == "cpu":
        # per device: k cores per model. Same machine: n cores, FlyThinker concurrent tries a few G+R splits.
        splits = sorted({(n - r, r) for r in (1, round(n * c_r / (c_g + c_r)), n // 2) if 1 <= r < n})
        plans += [("per-device", "sft", sft, "sequential", str(k), k, None),
                  ("per-device", "sequential", fly, "sequential", str(k), k, None),
                  ("per-device", "concurrent", fly, "threads", f"{k}+{k}", k, (k, k)),
                  ("same-machine", "sft", sft, "sequential", str(n), n, None),
                  ("same-machine", "sequential", fly, "sequential", str(n), n, None)]
        plans += [("same-machine", "concurrent", fly, "threads", f"{a}+{b}", n, (a, b)) for a, b in splits]
    else:
        plans += [("same-machine", "sft", sft, "sequential", "1gpu", None, None),
                  ("same-machine", "sequential", fly, "sequential", "1gpu", None, None),
                  ("same-machine", "concurrent", fly, "cuda_streams", "1gpu", None, None)]
        if torch.cuda.device_count() >= 2:  # the paper's setting: the Reasoner on its own GPU
            import copy

            other = torch.device("cuda", (device.index or 0) + 1 if (device.index or 0) + 1 < torch.cuda.device_count()
                                 else 0)
            fly2 = FlyThinker(generator, copy.deepcopy(reasoner).to(other), FlyThinkerConfig(lam=args.lam)).eval()
            plans += [("per-device", "sft", sft, "sequential", "1gpu", None, None),
                      ("per-device", "sequential", fly, "sequential", "1gpu", None, None),
                      ("per-device", "concurrent", fly2, "two_devices", "2gpu", None, None)]

    gen = torch.Generator().manual_seed(0)
    measured: dict[tuple, Row] = {}
    table: list[tuple[str, Row]] = []
    for batch in args.batch:
        ids = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=gen).to(device)
        keys, configs = [], []
        for comparison, method, model, backend, label, main_threads, split in plans:
            # A same-machine split equal to the per-device one is the same decode: measured once (its prefill,
            # which cannot overlap R and G anyway, then runs with the per-device thread count).
            key = (batch, method, label, backend)
            table.append((comparison, key))
            if key not in keys:
                keys.append(key)
                configs.append((model, main_threads, {"concurrent": backend, "cpu_threads": split}))
        print(f"bench decode: batch {batch}, {len(configs)} configurations x {args.runs} runs ...", file=sys.stderr,
              flush=True)
        for key, (pre, dec) in zip(keys, time_configs(configs, ids, args.new_tokens, args.runs)):
            measured[key] = Row(*key[:4], pre, dec)
    table = [(c, measured[key]) for c, key in table]

    def pick(batch: int, comparison: str, method: str) -> Row | None:
        rows = [r for c, r in table if c == comparison and r.batch == batch and r.method == method]
        return min(rows, key=lambda r: r.decode_ms) if rows else None

    summaries = {}
    for batch in args.batch:
        s_dev, q_dev, c_dev = (pick(batch, "per-device", m) for m in ("sft", "sequential", "concurrent"))
        s_all = pick(batch, "same-machine", "sft")
        fly_rows = [r for r in (pick(batch, "same-machine", "sequential"), pick(batch, "same-machine", "concurrent"))
                    if r is not None]
        best = min(fly_rows, key=lambda r: r.decode_ms)
        summaries[batch] = {
            "sft_ms": _ms(s_dev), "sequential_ms": _ms(q_dev), "concurrent_ms": _ms(c_dev),
            "ratio_concurrent_over_sft": _ratio(c_dev, s_dev), "ratio_sequential_over_sft": _ratio(q_dev, s_dev),
            "sft_best_ms": _ms(s_all), "best_ms": _ms(best), "best": f"{best.method}@{best.threads}",
            "ratio_best_over_sft_best": _ratio(best, s_all),
        }

    auto = resolve_backend(fly, "auto", num_threads=n)
    head = (f"flythinker bench decode: model={args.model} (Generator {_params(generator) / 1e6:.1f}M params, "
            f"Reasoner {_params(reasoner) / 1e6:.1f}M) device={device} dtype={str(dtype).replace('torch.', '')} "
            f"prompt={args.prompt_tokens} new={args.new_tokens} runs={args.runs} cores={n}")
    print(head)
    print(f"per-token multiply-adds at context {context}: C_G={c_g / 1e6:.1f}M C_R={c_r / 1e6:.1f}M "
          f"flop_ratio (C_G+C_R)/C_G = {flop_ratio:.3f}; auto backend with {n} threads: {auto}")
    if load_before is not None and load_before > 0.5:
        print(f"warning: load average was {load_before:.2f} before the benchmark; timings may be contended")
    print(f"{'batch':>5}  {'comparison':<12} {'method':<11} {'threads':>7}  {'prefill ms':>10}  "
          f"{'ms/token':>9}  {'tokens/s':>9}")
    for comparison, r in table:
        print(f"{r.batch:>5}  {comparison:<12} {r.method:<11} {r.threads:>7}  {r.prefill_ms:>10.1f}  "
              f"{r.decode_ms:>9.2f}  {1000 * r.batch / r.decode_ms:>9.1f}")
    for batch, s in summaries.items():
        print(f"batch {batch}: per device concurrent/SFT = {_fmt(s['ratio_concurrent_over_sft'])} (target <= 1.05), "
              f"sequential/SFT = {_fmt(s['ratio_sequential_over_sft'])}; same machine best ({s['best']})/best SFT = "
              f"{_fmt(s['ratio_best_over_sft_best'])} (target <= 1.05 x flop_ratio = {1.05 * flop_ratio:.3f})")

    first = 1 if 1 in args.batch else args.batch[0]
    result = dict(summaries[first])
    result.update({
        "batch": first, "threads": n, "per_model_threads": k if device.type == "cpu" else None,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "model": args.model,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
        "flop_ratio": round(flop_ratio, 4), "macs_generator": c_g, "macs_reasoner": c_r,
        "params_generator": _params(generator), "params_reasoner": _params(reasoner), "auto_backend": auto,
        "load_before": load_before, "by_batch": {str(b): s for b, s in summaries.items()},
        "rows": [dict(r.as_dict(), comparison=c) for c, r in table],
    })
    print_json_line(result)
    return 0


def _ms(row: Row | None) -> float | None:
    return None if row is None else round(row.decode_ms, 3)


def _ratio(a: Row | None, b: Row | None) -> float | None:
    return None if a is None or b is None else round(a.decode_ms / b.decode_ms, 4)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
