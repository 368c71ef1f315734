"""`flythinker demo`: the end-to-end tour a newcomer runs first, offline, on 2 CPU cores.

Owns the demo presets (quick / full) and the flow: make (or read) a personalized dataset with a user split ->
train FlyThinker and SFT with the same budget, data and seed -> generate for the held-out users -> score both ->
print a comparison table and write predictions, metrics, the position-sensitive plot and a report to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import add_dataclass_args, build_config, to_dict
from .data import DataConfig
from .predict import DecodeOptions
from .train import ModelArgs, TrainArgs
from .utils import UserError


@dataclass
class DemoConfig:
    """Everything `flythinker demo` does; `--quick` swaps in the small preset below."""

    data: str = ""
    """A directory with user/train.jsonl[.gz] and user/dev.jsonl (e.g. ../shared/data/commits); empty = generate
    the synthetic demo dataset."""
    out: str = "out/demo"
    """Output folder (predictions, metrics.json, report.md, segments.png, checkpoints)."""
    train_examples: int = 48
    """Training examples used (first N of user/train). Sized for < 20 min on 2 cores: at ~700-token sequences
    SFT costs ~6 s and FlyThinker ~7.5 s per example there; a first try with 120 examples of ~1000 tokens
    measured ~10 s per SFT example, i.e. ~45 min in all."""
    eval_examples: int = 24
    """Held-out examples generated and scored (first N of user/dev)."""
    seed: int = 0
    # λ = 0.2, not the paper's 0.5: on SmolLM2-135M with a few dozen steps, λ = 0.5 first raises the training loss
    # from ~3.3 to ~11 (the fused vector is half an embedding in a direction the Generator never saw) and the demo's
    # budget ends before it recovers; at λ = 0.2 training starts at ~3.5 (docs/results.md, "Why FlyThinker loses").
    model: ModelArgs = field(default_factory=lambda: ModelArgs(lam=0.2))
    data_cfg: DataConfig = field(default_factory=lambda: DataConfig(k=2, profile_tokens=384, query_tokens=128,
                                                                     target_tokens=256))
    train: TrainArgs = field(default_factory=lambda: TrainArgs(lr_generator=1e-4, lr_reasoner=1e-4, batch_size=1,
                                                               grad_accum=4, epochs=1, warmup_ratio=0.1,
                                                               keep_checkpoints=1, save_every=4))
    decode: DecodeOptions = field(default_factory=lambda: DecodeOptions(max_new_tokens=192, batch_size=8))
    bertscore: bool = True
    """Include BERTScore (needs the local MiniLM encoder)."""


def quick_preset(cfg: DemoConfig) -> DemoConfig:
    """< 3 minutes on 2 cores with the default models: a smoke-sized run, not a measurement."""
    return dataclasses.replace(
        cfg, train_examples=16, eval_examples=8,
        data_cfg=dataclasses.replace(cfg.data_cfg, k=1, profile_tokens=192, target_tokens=160),
        train=dataclasses.replace(cfg.train, grad_accum=2, save_every=0, lr_generator=2e-4, lr_reasoner=2e-4),
        decode=dataclasses.replace(cfg.decode, max_new_tokens=64, batch_size=8))


def _find(root: Path, split: str) -> Path:
    for name in (f"user/{split}.jsonl", f"user/{split}.jsonl.gz", f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root}: no user/{split}.jsonl[.gz] (expected a user-split dataset directory)")


def run_demo(cfg: DemoConfig, log=print) -> dict:
    from .data import load_examples
    from .experiment import MethodSpec, efficiency_table, remeasure_decode, run_method
    from .report import EvalConfig, run_evaluation
    from .utils import seed_everything, set_threads

    set_threads(cfg.train.threads or None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.data:
        root = Path(cfg.data)
        if not root.is_dir():
            raise UserError(f"--data {root}: not a directory")
        source = str(root)
    else:
        from .demo_data import write_demo_dataset

        root = out / "data"
        write_demo_dataset(root, seed=cfg.seed)
        source = f"synthetic demo dataset (seed {cfg.seed}) in {root}"
    train = load_examples(_find(root, "train"))[: cfg.train_examples]
    dev = load_examples(_find(root, "dev"))[: cfg.eval_examples]
    train_users = {e.user_id for e in train}
    dev = [e for e in dev if e.user_id not in train_users]  # user split: held-out users only
    if not train or not dev:
        raise UserError(f"{root}: need training examples and held-out dev users; got {len(train)} / {len(dev)}")
    log(f"data: {source}: {len(train)} training examples ({len(train_users)} users), "
        f"{len(dev)} held-out examples ({len({e.user_id for e in dev})} unseen users)")
    seed_everything(cfg.seed)
    methods = [MethodSpec("SFT", "sft"), MethodSpec("FlyThinker", "flythinker")]
    results = []
    for spec in methods:
        train_args = dataclasses.replace(cfg.train, seed=cfg.seed)
        results.append(run_method(spec, train, dev, cfg.model, cfg.data_cfg, train_args, cfg.decode, out / "runs",
                                  progress=cfg.train.progress, log=log))
    tok = _tokenizer_of(cfg)
    remeasure_decode(results, methods, cfg.model, cfg.data_cfg, dev[0], out / "runs", tok, log=log)
    metrics = ("rouge1", "rougeL", "bleu", "meteor") + (("bertscore",) if cfg.bertscore else ())
    report = run_evaluation([r.predictions for r in results], out / "eval",
                            EvalConfig(metrics=metrics, baseline="SFT", seed=cfg.seed), tokenizer=tok)
    eff = efficiency_table(results)
    summary = {"data": source, "train_examples": len(train), "eval_examples": len(dev),
               "metrics": report.methods, "comparisons": report.comparisons, "efficiency": eff,
               "files": report.files, "seconds": round(time.perf_counter() - t0, 1), "config": to_dict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log("")
    log(comparison_table(report.methods, metrics, eff))
    log(f"\nwrote {out}/eval/report.md, metrics.json, segments.png and per-method predictions under {out}/runs "
        f"({summary['seconds']:.0f} s)")
    return summary


def comparison_table(methods: dict, metrics, efficiency) -> str:
    eff = {r["method"]: r for r in efficiency}
    head = f"{'method':<12}" + "".join(f"{m:>10}" for m in metrics) + f"{'train s/step':>14}{'ms/token':>10}"
    lines = [head, "-" * len(head)]
    for name, scores in methods.items():
        e = eff.get(name, {})
        cells = "".join(f"{_fmt(scores['metrics'].get(m)):>10}" for m in metrics)
        lines.append(f"{name:<12}{cells}{_fmt(e.get('train_s_per_step'), 2):>14}{_fmt(e.get('decode_ms_per_token'), 1):>10}")
    return "\n".join(lines)


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _tokenizer_of(cfg: DemoConfig):
    from .defaults import load_models

    if cfg.model.generator in ("", "default"):
        from .defaults import load_default_tokenizer

        return load_default_tokenizer()
    _, _, tok = load_models(cfg.model.generator, "none")
    return tok


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small preset (< 3 min on 2 cores)")
    parser.add_argument("--config", help="YAML overriding the demo configuration")
    parser.add_argument("--generator", help="shortcut for --model.generator")
    parser.add_argument("--reasoner", help="shortcut for --model.reasoner")
    add_dataclass_args(parser, DemoConfig)
    parser.set_defaults(func=_cli_main)


def _cli_main(args: argparse.Namespace) -> int:
    base = DemoConfig()
    if args.quick:
        base = quick_preset(base)
    cfg = build_config(DemoConfig, args, args.config)
    # Flags/YAML only override what they name: start from the preset, then apply the explicit settings.
    cfg = _overlay(base, cfg, DemoConfig())
    if args.generator:
        cfg.model.generator = args.generator
    if args.reasoner:
        cfg.model.reasoner = args.reasoner
    run_demo(cfg)
    return 0


def _overlay(preset, explicit, default):
    """Fields of `explicit` that differ from the plain defaults win over the preset (recursively)."""
    out = {}
    for f in dataclasses.fields(preset):
        p, e, d = getattr(preset, f.name), getattr(explicit, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(p):
            out[f.name] = _overlay(p, e, d)
        else:
            out[f.name] = e if e != d else p
    return type(preset)(**out)
