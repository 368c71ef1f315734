"""`flythinker bench decode`: prefill time and ms per new token of SFT (the Generator alone), FlyThinker sequential and
FlyThinker concurrent (the Reasoner on a worker thread, "threads", or in a worker process, "process"), compared per
device (each model gets the same compute, the paper's setting: here the same number of cores per model) and on the same
machine (each method in its fastest configuration using all cores), at each weights dtype (float32, and bfloat16 where
the hardware computes it natively; every configuration of every dtype is timed interleaved). The automatic choice
("auto": on one CPU device a short calibration, cached, see `flythinker.decoding.calibrate`) is timed as a row of its
own beside the explicit configurations; the dtype that `--dtype auto` picks at each batch
(`flythinker.decoding.dtype_choice`) is reported beside it (auto_dtype, auto_dtype_source, auto_dtype_ms: the auto row
in that dtype). Prints a table; the CLI ends with one JSON line.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..methods.base import ModelArgs
from ..utils import UserError, native_bf16, resolve_dtype

MODELS = ("medium", "tiny", "default")


def default_dtypes(device: torch.device | str) -> list[str]:
    """float32, plus bfloat16 where `device` computes bf16 natively (`utils.native_bf16`): both sides of the choice
    `--dtype auto` makes there."""
    return ["float32", "bfloat16"] if native_bf16(device) else ["float32"]


@dataclass
class DecodeBenchConfig:
    """`flythinker bench decode` settings."""

    model: Literal["medium", "tiny", "default"] = "medium"
    """medium: random ~200M Llama Generator + ~55M Reasoner (vocab 49152); tiny: the test models; default: the
    embedded pretrained models."""
    prompt_tokens: int = 512
    """Prompt length per row."""
    new_tokens: int = 32
    """Tokens generated per run (>= 2: one comes from the prefill)."""
    batch: list[int] = field(default_factory=lambda: [1, 8])
    """Batch sizes (comma-separated on the command line)."""
    runs: int = 3
    """Timed runs per configuration: prefill is the median over runs, ms/token the median over every decode step
    of every run."""
    threads: int = 0
    """CPU cores the benchmark may use (0: all this process may run on)."""
    lam: float = 0.5
    """λ of the FlyThinker model."""
    device: str = ""
    """cpu or cuda (empty: cuda when available)."""
    dtype: list[Literal["float32", "bfloat16", "float16"]] = field(default_factory=list)
    """Weights dtypes to time, interleaved (comma-separated). Empty: float32, plus bfloat16 where the device
    computes it natively (`flythinker.utils.native_bf16`)."""
    comparison: Literal["both", "per-device", "same-machine"] = "both"
    """Which comparison to time: both, or only one (per-device alone interleaves just SFT, sequential, threads and
    process at the per-model core count, so each is timed more often in the same minutes; no auto row then)."""
    methods: list[str] = field(default_factory=list)
    """Registered methods to compare instead (e.g. sft,flythinker,cot,coconut,interleaved): ms per response token
    and seconds for a fixed response, ratios to SFT beside Table 8's prediction, memory (bench_methods.py)."""
    plot: str = ""
    """With methods: also write the Fig. 3-style PNG here."""
    method_args: ModelArgs = field(default_factory=ModelArgs)
    """With methods: the method settings every method is built with, as `--model.*` in train/study (e.g.
    --method_args.coconut.latents 16, --method_args.cot.max_reasoning_tokens 64, --method_args.fusion.lam 0.2);
    its generator / reasoner / method fields are not used (`--model` picks the models)."""

    def __post_init__(self) -> None:
        if self.new_tokens < 2:
            raise UserError("--new-tokens must be >= 2 (one token comes from the prefill)")
        if self.prompt_tokens < 1 or self.runs < 1:
            raise UserError("--prompt-tokens and --runs must be >= 1")
        if self.threads < 0:
            raise UserError("--threads must be >= 1 (0 = all cores)")
        if not self.batch or min(self.batch) < 1:
            raise UserError(f"--batch must be positive integers; got {self.batch}")
        if self.comparison not in ("both", "per-device", "same-machine"):
            raise UserError(f"--comparison must be both, per-device or same-machine; got {self.comparison!r}")
        if len(set(self.dtype)) != len(self.dtype) or any(d not in ("float32", "bfloat16", "float16")
                                                          for d in self.dtype):
            raise UserError(f"--dtype must list float32, bfloat16 and/or float16, each once; got {self.dtype}")


def _load(name: str):
    from ..testing import medium_models, tiny_lm, tiny_tokenizer

    if name == "medium":
        return medium_models()
    if name == "tiny":

        return tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1), tiny_tokenizer()
    from ..models import load_default_models

    return load_default_models(reasoner_layers=None)


@dataclass
class Row:
    dtype: str               # weights dtype: float32 | bfloat16 | float16
    batch: int
    method: str              # sft | sequential | concurrent (threads) | process | auto (FlyThinker, "auto")
    threads: str             # "2" (one pool), "1+1" (Generator + Reasoner pools), "gpu"
    backend: str
    prefill_ms: float
    decode_ms: float         # per decode step = per new token of each row

    def as_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "batch": self.batch, "method": self.method, "threads": self.threads,
                "backend": self.backend,
                "prefill_ms": round(self.prefill_ms, 3), "decode_ms": round(self.decode_ms, 3),
                "tokens_per_s": round(1000.0 * self.batch / self.decode_ms, 2)}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _params(lm) -> int:
    return sum(p.numel() for p in lm.parameters())


def run_decode(args: DecodeBenchConfig) -> dict:
    """Run the benchmark, print the table, return the summary (the CLI prints it as the final JSON line)."""
    from ..decoding.concurrency import pinned_threads
    from ..decoding.dtype_choice import choose_decode_dtype, decode_lms
    from ..decoding.sampling import DecodeConfig
    from ..methods.flythinker.config import FlyThinkerConfig
    from ..methods.flythinker.decode import choose_backend, per_token_macs
    from ..methods.flythinker.model import FlyThinker
    from .timing import time_configs

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    n = args.threads or _cores()
    k = max(1, n // 2)  # per-device comparison: each model gets k cores (one each on a 2-core machine)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    generator, reasoner, tokenizer = _load(args.model)
    dtypes = list(args.dtype) or default_dtypes(device)
    # One copy of the models per dtype (the last one casts the loaded models themselves).
    variants: dict[str, tuple[Any, Any, Any, Any]] = {}
    for i, name in enumerate(dtypes):
        last = i == len(dtypes) - 1
        g = (generator if last else copy.deepcopy(generator)).to(device=device, dtype=resolve_dtype(name))
        r = (reasoner if last else copy.deepcopy(reasoner)).to(device=device, dtype=resolve_dtype(name))
        variants[name] = (g, r, FlyThinker(g, r, FlyThinkerConfig(lam=args.lam)).eval(), FlyThinker(g, None).eval())
    fly = variants[dtypes[0]][2]
    limit = getattr(generator.config, "max_position_embeddings", None)
    if limit is not None and args.prompt_tokens + args.new_tokens > limit:
        raise UserError(f"--prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} exceeds the "
                        f"model's context of {limit}")
    vocab = len(tokenizer) if tokenizer is not None else generator.get_input_embeddings().num_embeddings
    context = args.prompt_tokens + args.new_tokens // 2  # mean cache length while decoding
    c_g, c_r = per_token_macs(fly, context)
    flop_ratio = (c_g + c_r) / c_g

    # (dtype, comparison, method, model, backend, label, main threads, (G, R) threads); each distinct one measured
    # once.
    plans: list[tuple[str, str, str, Any, str, str, int | None, tuple[int, int] | None]] = []
    for dt, (g, r, fly_dt, sft) in variants.items():
        if device.type == "cpu":
            # per device: k cores per model. Same machine: n cores, FlyThinker concurrent tries a few G+R splits.
            splits = sorted({(n - x, x) for x in (1, round(n * c_r / (c_g + c_r)), n // 2) if 1 <= x < n})
            plans += [(dt, "per-device", "sft", sft, "sequential", str(k), k, None),
                      (dt, "per-device", "sequential", fly_dt, "sequential", str(k), k, None),
                      (dt, "per-device", "concurrent", fly_dt, "threads", f"{k}+{k}", k, (k, k)),
                      (dt, "per-device", "process", fly_dt, "process", f"{k}+{k}", k, (k, k)),
                      (dt, "same-machine", "sft", sft, "sequential", str(n), n, None),
                      (dt, "same-machine", "sequential", fly_dt, "sequential", str(n), n, None)]
            plans += [(dt, "same-machine", "concurrent", fly_dt, "threads", f"{a}+{b}", n, (a, b)) for a, b in splits]
            plans += [(dt, "same-machine", "process", fly_dt, "process", f"{a}+{b}", n, (a, b)) for a, b in splits]
            plans.append((dt, "same-machine", "auto", fly_dt, "auto", "auto", n, None))
        else:
            plans += [(dt, "same-machine", "sft", sft, "sequential", "1gpu", None, None),
                      (dt, "same-machine", "sequential", fly_dt, "sequential", "1gpu", None, None),
                      (dt, "same-machine", "concurrent", fly_dt, "cuda_streams", "1gpu", None, None)]
            if torch.cuda.device_count() >= 2:  # the paper's setting: the Reasoner on its own GPU
                other = torch.device("cuda", (device.index or 0) + 1
                                     if (device.index or 0) + 1 < torch.cuda.device_count() else 0)
                fly2 = FlyThinker(g, copy.deepcopy(r).to(other), FlyThinkerConfig(lam=args.lam)).eval()
                plans += [(dt, "per-device", "sft", sft, "sequential", "1gpu", None, None),
                          (dt, "per-device", "sequential", fly_dt, "sequential", "1gpu", None, None),
                          (dt, "per-device", "concurrent", fly2, "two_devices", "2gpu", None, None)]
            plans.append((dt, "same-machine", "auto", fly_dt, "auto", "1gpu", None, None))

    if args.comparison != "both":
        plans = [p for p in plans if p[1] == args.comparison]
        if not plans:
            raise UserError(f"--comparison {args.comparison} has no configuration on {device} "
                            f"(per-device on CUDA needs two GPUs)")
    gen = torch.Generator().manual_seed(0)
    measured: dict[tuple, Row] = {}
    table: list[tuple[str, Row]] = []
    prompts: dict[int, torch.Tensor] = {}
    for batch in args.batch:
        ids = prompts[batch] = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=gen).to(device)
        keys, configs = [], []
        for dt, comparison, method, model, backend, label, main_threads, split in plans:
            # A same-machine split equal to the per-device one is the same decode: measured once (its prefill,
            # which cannot overlap R and G anyway, then runs with the per-device thread count).
            key = (dt, batch, method, label, backend)
            table.append((comparison, key))
            if key not in keys:
                keys.append(key)
                configs.append((model, main_threads, {"concurrent": backend, "cpu_threads": split}))
        print(f"bench decode: batch {batch}, {len(configs)} configurations x {args.runs} runs ...", file=sys.stderr,
              flush=True)
        for key, (pre, dec) in zip(keys, time_configs(configs, ids, args.new_tokens, args.runs)):
            measured[key] = Row(*key, pre, dec)
    table = [(c, measured[key]) for c, key in table]

    def pick(batch: int, comparison: str, method: str, dt: str) -> Row | None:
        rows = [r for c, r in table if c == comparison and r.batch == batch and r.method == method and r.dtype == dt]
        return min(rows, key=lambda r: r.decode_ms) if rows else None

    by_dtype: dict[str, dict[int, dict[str, Any]]] = {dt: {} for dt in dtypes}
    for dt, batch in ((dt, batch) for dt in dtypes for batch in args.batch):
        s_dev, q_dev, c_dev, p_dev = (pick(batch, "per-device", m, dt)
                                      for m in ("sft", "sequential", "concurrent", "process"))
        s_all = pick(batch, "same-machine", "sft", dt)
        a_all = pick(batch, "same-machine", "auto", dt)
        fly_rows = [r for r in (pick(batch, "same-machine", "sequential", dt),
                                pick(batch, "same-machine", "concurrent", dt),
                                pick(batch, "same-machine", "process", dt)) if r is not None]
        best = min(fly_rows, key=lambda r: r.decode_ms) if fly_rows else None
        by_dtype[dt][batch] = {
            "sft_ms": _ms(s_dev), "sequential_ms": _ms(q_dev), "concurrent_ms": _ms(c_dev),
            "ratio_concurrent_over_sft": _ratio(c_dev, s_dev), "ratio_sequential_over_sft": _ratio(q_dev, s_dev),
            "process_ms": _ms(p_dev), "ratio_process_over_sft": _ratio(p_dev, s_dev),
            "sft_best_ms": _ms(s_all), "best_ms": _ms(best), "best": f"{best.method}@{best.threads}" if best else None,
            "ratio_best_over_sft_best": _ratio(best, s_all),
            "auto_ms": _ms(a_all), "ratio_auto_over_best": _ratio(a_all, best),
        }
    summaries = by_dtype[dtypes[0]]

    # What "auto" ran, per batch size (the calibration's cached answer: the timed runs made it), for the first dtype.
    auto_by_batch = {}
    for batch in args.batch if args.comparison != "per-device" else ():
        with pinned_threads(n if device.type == "cpu" else None):
            name, split, choice = choose_backend(fly, prompts[batch], DecodeConfig(max_new_tokens=args.new_tokens))
        auto_by_batch[batch] = {"backend": name, "cpu_threads": list(split) if split else None,
                                "source": choice.source if choice is not None else "rule"}
        summaries[batch].update(auto_backend=name, auto_threads=auto_by_batch[batch]["cpu_threads"],
                                auto_source=auto_by_batch[batch]["source"])
        # What `--dtype auto` decodes in at this batch (decoding.dtype_choice: measured on a CPU with native bf16,
        # cached), and the auto row's ms/token in that dtype when this bench timed it.
        with pinned_threads(n if device.type == "cpu" else None):
            dt_choice = choose_decode_dtype(decode_lms(fly), batch, device=device)
        auto_by_batch[batch]["dtype"] = dt_choice.name
        summaries[batch].update(auto_dtype=dt_choice.name, auto_dtype_source=dt_choice.source,
                                auto_dtype_ms=by_dtype.get(dt_choice.name, {}).get(batch, {}).get("auto_ms"))
    auto = auto_by_batch.get(1 if 1 in args.batch else args.batch[0], {}).get("backend")
    head = (f"flythinker bench decode: model={args.model} (Generator {_params(generator) / 1e6:.1f}M params, "
            f"Reasoner {_params(reasoner) / 1e6:.1f}M) device={device} dtype={','.join(dtypes)} "
            f"(native bf16: {native_bf16(device)}) prompt={args.prompt_tokens} new={args.new_tokens} "
            f"runs={args.runs} cores={n}")
    print(head)
    print(f"per-token multiply-adds at context {context}: C_G={c_g / 1e6:.1f}M C_R={c_r / 1e6:.1f}M "
          f"flop_ratio (C_G+C_R)/C_G = {flop_ratio:.3f}")
    print("auto with " + (f"{n} threads" if device.type == "cpu" else str(device)) + ": " + (", ".join(
        f"batch {b} -> {a['backend']}" + (f" {a['cpu_threads'][0]}+{a['cpu_threads'][1]}" if a["cpu_threads"] else "")
        + f" ({a['source']}), dtype {a['dtype']}" for b, a in auto_by_batch.items()) or "not timed"))
    if load_before is not None and load_before > 0.5:
        print(f"warning: load average was {load_before:.2f} before the benchmark; timings may be contended")
    print(f"{'dtype':<9} {'batch':>5}  {'comparison':<12} {'method':<11} {'threads':>7}  {'prefill ms':>10}  "
          f"{'ms/token':>9}  {'tokens/s':>9}")
    for comparison, r in table:
        print(f"{r.dtype:<9} {r.batch:>5}  {comparison:<12} {r.method:<11} {r.threads:>7}  {r.prefill_ms:>10.1f}  "
              f"{r.decode_ms:>9.2f}  {1000 * r.batch / r.decode_ms:>9.1f}")
    for dt in dtypes:
        for batch, s in by_dtype[dt].items():
            parts = []
            if args.comparison != "same-machine":
                parts.append(f"per device concurrent/SFT = {_fmt(s['ratio_concurrent_over_sft'])} with threads, "
                             f"{_fmt(s['ratio_process_over_sft'])} with process (target <= 1.05), sequential/SFT = "
                             f"{_fmt(s['ratio_sequential_over_sft'])}")
            if args.comparison != "per-device":
                parts.append(f"same machine best ({s['best']})/best SFT = {_fmt(s['ratio_best_over_sft_best'])} "
                             f"(target <= 1.05 x flop_ratio = {1.05 * flop_ratio:.3f}); auto {_fmt(s['auto_ms'])} "
                             f"ms/token = {_fmt(s['ratio_auto_over_best'])} x the best configuration")
            print(f"{dt} batch {batch}: " + "; ".join(parts))
    first = 1 if 1 in args.batch else args.batch[0]
    # Per method, the faster configuration of each dtype on the whole machine: bf16 ms/token over fp32's.
    low = {m: _ratio(pick(first, "same-machine", m, "bfloat16"), pick(first, "same-machine", m, "float32"))
           for m in ("sft", "sequential", "concurrent", "process")} if {"float32", "bfloat16"} <= set(dtypes) else None
    if low is not None:
        print(f"batch {first}: bf16/fp32 ms per token (same machine): "
              + ", ".join(f"{m} {_fmt(v)}" for m, v in low.items()))

    result = dict(summaries[first])
    result.update({
        "batch": first, "threads": n, "per_model_threads": k if device.type == "cpu" else None,
        "device": str(device), "dtype": dtypes[0], "dtypes": dtypes, "native_bf16": native_bf16(device),
        "bf16_over_fp32": low, "model": args.model,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
        "comparison": args.comparison,
        "flop_ratio": round(flop_ratio, 4), "macs_generator": c_g, "macs_reasoner": c_r,
        "params_generator": _params(generator), "params_reasoner": _params(reasoner), "auto_backend": auto,
        "load_before": load_before, "by_batch": {str(b): s for b, s in summaries.items()},
        "by_dtype": {dt: {str(b): s for b, s in v.items()} for dt, v in by_dtype.items()},
        "rows": [dict(r.as_dict(), comparison=c) for c, r in table],
    })
    return result


def _ms(row: Row | None) -> float | None:
    return None if row is None else round(row.decode_ms, 3)


def _ratio(a: Row | None, b: Row | None) -> float | None:
    return None if a is None or b is None else round(a.decode_ms / b.decode_ms, 4)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
