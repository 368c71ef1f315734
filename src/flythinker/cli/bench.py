"""`flythinker bench decode|train`: the benchmarks (flythinker.experiments.bench_decode / bench_train). Each prints a
readable table and ends with one JSON line; both take `--config YAML` and flags like every verb."""

from __future__ import annotations

import argparse

from ..config import add_dataclass_args, build_config


def add_cli(parser: argparse.ArgumentParser) -> None:
    from ..experiments.bench_decode import DecodeBenchConfig
    from ..experiments.bench_train import TrainBenchConfig

    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    d = sub.add_parser(
        "decode", help="ms per new token: SFT vs FlyThinker sequential vs concurrent",
        description="Decode latency of the Generator alone (SFT), FlyThinker sequential and FlyThinker with the "
                    "Reasoner running concurrently, at each batch size, per device and on the same machine.")
    d.add_argument("--config", help="YAML with the settings below (flags override it)")
    add_dataclass_args(d, DecodeBenchConfig)
    d.set_defaults(func=_decode, config_cls=DecodeBenchConfig)
    t = sub.add_parser("train", help="seconds per training step: SFT vs FlyThinker, fp32 vs bf16",
                       description="Seconds per optimizer step of SFT and FlyThinker on the same batch, at each "
                                   "--precision (fp32; bf16 autocast with fp32 master weights).")
    t.add_argument("--config", help="YAML with the settings below (flags override it)")
    add_dataclass_args(t, TrainBenchConfig)
    t.set_defaults(func=_train, config_cls=TrainBenchConfig)
    from ..experiments.bench_serve import ServeBenchConfig

    v = sub.add_parser("serve", help="load test of `flythinker serve`: throughput, p50/p95 latency, time to 1st token",
                       description="Starts a server on 127.0.0.1, sends streaming requests at each client "
                                   "concurrency, reports throughput, latency and TTFT per level and the ratio of the "
                                   "most clients to the fewest.")
    v.add_argument("--config", help="YAML with the settings below (flags override it)")
    add_dataclass_args(v, ServeBenchConfig)
    v.set_defaults(func=_serve, config_cls=ServeBenchConfig)


def _decode(args: argparse.Namespace) -> int:
    from ..experiments.bench_decode import run_decode
    from .main import print_json_line

    cfg = build_config(args.config_cls, args, args.config)
    if cfg.methods:
        return _methods(cfg, "decode", runs=cfg.runs, examples=1, new_tokens=cfg.new_tokens)
    print_json_line(run_decode(cfg))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ..experiments.bench_serve import run_serve_bench
    from .main import print_json_line

    print_json_line(run_serve_bench(build_config(args.config_cls, args, args.config)))
    return 0


def _methods(cfg, what: str, runs: int, examples: int, new_tokens: int, precision: list[str] | None = None,
             optimizer_impl: str = "auto") -> int:
    from ..experiments.bench_methods import plot, print_table, run_methods_bench
    from ..utils import set_threads
    from .main import print_json_line

    threads = set_threads(cfg.threads or None)
    res = run_methods_bench(cfg.methods, cfg.model, what, runs=runs, n_examples=examples, new_tokens=new_tokens,
                            threads=threads, precision=precision or ["fp32"], optimizer_impl=optimizer_impl,
                            method_args=cfg.method_args)
    print_table(res)
    if cfg.plot:
        res["plot"] = plot(res, cfg.plot)
    print_json_line(res)
    return 0


def _train(args: argparse.Namespace) -> int:
    from ..experiments.bench_train import default_precisions, run
    from ..utils import set_threads
    from .main import print_json_line

    cfg = build_config(args.config_cls, args, args.config)
    precisions = list(cfg.precision) or default_precisions("cpu")
    if cfg.methods:
        return _methods(cfg, "train", runs=cfg.steps, examples=cfg.examples, new_tokens=32, precision=precisions,
                        optimizer_impl=cfg.optimizer_impl)
    threads = set_threads(cfg.threads or None)
    res = run(cfg.model, cfg.tokens, cfg.batch, cfg.steps, cfg.warmup, threads, precisions, cfg.optimizer_impl)
    print(f"{'precision':<11}{'method':<12}{'s/step':>10}{'loss':>10}")
    for p, r in res["by_precision"].items():
        for name in ("sft", "flythinker"):
            print(f"{p:<11}{name:<12}{r[f'{name}_s_per_step']:>10.3f}{r[f'{name}_loss']:>10.4f}")
    for p, r in res["by_precision"].items():
        print(f"{p}: ratio flythinker/sft {r['ratio_flythinker_over_sft']:.3f} (flop ratio {res['flop_ratio']:.3f})")
    if "bf16_over_fp32" in res:
        print("bf16/fp32 s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in res["bf16_over_fp32"].items()))
    print_json_line(res)
    return 0
