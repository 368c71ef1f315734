"""`flythinker demo`: the end-to-end tour a newcomer runs first, offline, on 2 CPU cores.

Owns the demo presets (quick / full) and the flow: make (or read) a personalized dataset with a user split ->
train FlyThinker and SFT with the same budget, data and seed -> generate for the held-out users -> score both ->
print a comparison table and write predictions, metrics, the position-sensitive plot and a report to --out.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..data import DataConfig
from ..decoding.sampling import DecodeConfig
from ..methods.base import ModelArgs
from ..methods.flythinker.config import FlyThinkerConfig
from ..safeio import atomic_write_text
from ..training.config import TrainArgs
from ..utils import UserError


@dataclass
class DemoConfig:
    """Everything `flythinker demo` does; `--quick` swaps in the small preset below."""

    data_dir: str = ""
    """A directory with user/train.jsonl[.gz] and user/dev.jsonl (e.g. ../shared/data/commits); empty = generate
    the synthetic demo dataset (`--data DIR` is a shortcut)."""
    out: str = "out/demo"
    """Output folder (predictions, metrics.json, report.md, segments.png, checkpoints)."""
    train_examples: int = 48
    """Training examples used (first N of user/train); sized so the full demo takes minutes on 2 CPU cores."""
    eval_examples: int = 24
    """Held-out examples generated and scored (first N of user/dev)."""
    seed: int = 0
    # λ = 0.2, not the paper's 0.5: on a 135M Generator with a few dozen steps, λ = 0.5 spends the budget recovering
    # from its initial loss jump (the fused vector is an offset the Generator never saw; docs/results.md).
    model: ModelArgs = field(default_factory=lambda: ModelArgs(fusion=FlyThinkerConfig(lam=0.2)))
    data: DataConfig = field(default_factory=lambda: DataConfig(k=2, profile_tokens=384, query_tokens=128,
                                                                     target_tokens=256))
    train: TrainArgs = field(default_factory=lambda: TrainArgs(lr_generator=1e-4, lr_reasoner=1e-4, batch_size=1,
                                                               grad_accum=4, epochs=1, warmup_ratio=0.1,
                                                               keep_checkpoints=1, save_every=4))
    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(max_new_tokens=192, batch_size=8, seed=0))
    bertscore: bool = True
    """Include BERTScore (needs the local MiniLM encoder)."""


def quick_preset(cfg: DemoConfig) -> DemoConfig:
    """A smoke-sized run (a few minutes on 2 cores with the default models), not a measurement."""
    return dataclasses.replace(
        cfg, train_examples=16, eval_examples=8,
        data=dataclasses.replace(cfg.data, k=1, profile_tokens=192, target_tokens=160),
        train=dataclasses.replace(cfg.train, grad_accum=2, save_every=0, lr_generator=2e-4, lr_reasoner=2e-4),
        decode=dataclasses.replace(cfg.decode, max_new_tokens=64, batch_size=8))


def _find(root: Path, split: str) -> Path:
    for name in (f"user/{split}.jsonl", f"user/{split}.jsonl.gz", f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root}: no user/{split}.jsonl[.gz] (expected a user-split dataset directory)")


def run_demo(cfg: DemoConfig, log=print) -> dict:
    from ..safeio import check_output_dir, exclusive_lock

    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise UserError(f"--data {cfg.data_dir}: not a directory")
    out = check_output_dir(cfg.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "demo out"):  # two demos on one folder would mix their runs
        return _run_demo(cfg, out, log)


def _run_demo(cfg: DemoConfig, out: Path, log) -> dict:
    from ..data import load_examples
    from ..evaluation.report import EvalConfig, run_evaluation
    from ..utils import seed_everything, set_threads
    from .runner import MethodSpec, efficiency_table, remeasure_decode, run_method

    set_threads(cfg.train.threads or None)
    t0 = time.perf_counter()
    if cfg.data_dir:
        root = Path(cfg.data_dir)
        source = str(root)
    else:
        from .synthetic import write_demo_dataset

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
        results.append(run_method(spec, train, dev, cfg.model, cfg.data, train_args, cfg.decode, out / "runs",
                                  progress=cfg.train.progress, log=log))
    tok = _tokenizer_of(cfg)
    remeasure_decode(results, methods, cfg.model, cfg.data, dev[0], out / "runs", tok, log=log)
    metrics = ("rouge1", "rougeL", "bleu", "meteor") + (("bertscore",) if cfg.bertscore else ())
    report = run_evaluation([r.predictions for r in results], out / "eval",
                            EvalConfig(metrics=metrics, baseline="SFT", seed=cfg.seed), tokenizer=tok)
    eff = efficiency_table(results)
    summary = {"data": source, "train_examples": len(train), "eval_examples": len(dev),
               "metrics": report.methods, "comparisons": report.comparisons, "efficiency": eff,
               "files": report.files, "seconds": round(time.perf_counter() - t0, 1), "config": to_dict(cfg)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
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
    from ..models import load_tokenizer

    return load_tokenizer(cfg.model.generator)
