"""Evaluating prediction files: metrics per method, paired CIs against a baseline, and the report files.

Owns: reading prediction JSONL files (one method per file; the method is the lines' "method" field or the file
stem; a malformed line is a one-line error naming file and line), `EvalConfig` (what to compute; `from_dict` builds
and validates it from YAML-style keys), `run_evaluation` (metrics per method, position-sensitive segments, optional
LLM judge, paired bootstrap CIs of every method against a baseline) and the report files (metrics.json, report.md,
segments.png). The metric definitions live in `flythinker.evaluation.metrics`, the comparison in
`.bootstrap`, segments in `.segments`, the judge in `.judge`; the `evaluate` verb is `flythinker.cli.evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, from_dict
from ..predictions import PredictionSet, read_predictions
from ..utils import UserError
from .bootstrap import paired_bootstrap
from .metrics import DEFAULT_METRICS, METRIC_LABELS, Scores, check_metrics, score_examples
from .segments import DEFAULT_BOUNDARIES, DEFAULT_SEGMENT_METRICS, parse_boundaries, plot_segments, segment_scores


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
    """A `flythinker.evaluation.judge.JudgeConfig`, or None."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "evaluation config") -> EvalConfig:
        """An EvalConfig from YAML-style keys (its field names; `judge:` holds `JudgeConfig`'s), checked the way
        `flythinker evaluate` checks its flags, before any scoring.

        `metrics` / `segment_metrics`: a list or a comma-separated string. `segments`: boundaries ("0,50,end" or a
        list), or none/off/null to skip. `judge`: used when it names a url or a model. An unknown key (also inside
        `judge:`) or a value of the wrong type is a ConfigError naming it; a bad metric name, boundary, n_boot or
        confidence is a UserError."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        judge_section = d.pop("judge", None)
        for key in ("metrics", "segment_metrics"):
            if isinstance(d.get(key), str):
                d[key] = [m.strip() for m in d[key].split(",") if m.strip()]
        seg = d.get("segments")
        if seg is False or (isinstance(seg, str) and seg.lower() in ("", "none", "off")):
            d["segments"] = None  # YAML reads a bare `off` as false
        elif isinstance(seg, (list, tuple)):
            d["segments"] = ",".join(map(str, seg))
        cfg = from_dict(cls, d, where)
        cfg.judge = _judge_config(judge_section, f"{where}.judge")
        if cfg.segments:
            parse_boundaries(cfg.segments)  # fail on a bad spec before any scoring
        if cfg.n_boot < 1:
            raise UserError(f"--n-boot must be >= 1; got {cfg.n_boot}")
        if not 0 < cfg.confidence < 1:
            raise UserError(f"--confidence must be in (0, 1); got {cfg.confidence}")
        if cfg.mode not in ("mean", "longlamp"):
            raise UserError(f"--mode must be 'mean' or 'longlamp'; got {cfg.mode!r}")
        cfg.metrics = check_metrics(cfg.metrics)
        cfg.segment_metrics = check_metrics(cfg.segment_metrics)
        return cfg


def _judge_config(section: Any, where: str) -> Any:
    """The `judge:` section as a JudgeConfig: None when absent or when it names neither a url nor a model."""
    if section is None:
        return None
    from .judge import JudgeConfig

    if isinstance(section, JudgeConfig):
        return section
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    known = [f.name for f in dataclasses.fields(JudgeConfig)]
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    if not section.get("url") and not section.get("model"):
        return None
    if not section.get("url"):
        raise UserError("--judge-model needs --judge-url")
    return from_dict(JudgeConfig, {**section, "model": section.get("model") or ""}, where)


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


def load_segment_tokenizer(spec: str) -> tuple[Any, str]:
    """(tokenizer, description) for segmenting: a FlyThinker checkpoint (its generator/), a tokenizer folder,
    or "tiny" (the built-in test tokenizer); loaded by `flythinker.models.load_tokenizer`."""
    from ..models import load_tokenizer

    if spec == "tiny":
        return load_tokenizer("tiny"), "tiny test tokenizer"
    p = Path(spec)
    if (p / "flythinker.json").is_file():
        p = p / "generator"
    if not p.is_dir():
        raise UserError(f"--tokenizer {spec}: not a directory (pass the Generator's tokenizer folder or a "
                        f"FlyThinker checkpoint)")
    return load_tokenizer(str(p), flag="--tokenizer"), str(p)


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

        info["judge"] = {"url": cfg.judge.url, "model": cfg.judge.model, "normalize": cfg.judge.normalize}
        for s in sets:
            sc = scores[s.method]
            pos = {i: k for k, i in enumerate(s.ids)}
            rows = [pos[i] for i in sc.ids]  # the pairs that were scored (non-empty), in score order
            res = judge(cfg.judge, [s.predictions[k].strip() for k in rows],
                        [s.references[k].strip() for k in rows], [s.inputs[k] for k in rows])
            sc.per_example["judge"] = np.array(res.normalized, dtype=np.float64)
            sc.values["judge"] = res.mean_normalized
            methods[s.method]["metrics"]["judge"] = _num(res.mean_normalized)
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
        how = "(s−1)/4" if j["normalize"] == "minmax" else "s/5"
        lines.append(f"- LLM judge: `{j['model']}` at {j['url']}, paper rubric (Figure 9), 1–5 normalized as {how}.")
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


def summary_lines(report: EvalReport) -> list[str]:
    """What `flythinker evaluate` prints: one line per method (n, dropped, every metric), then the files written."""
    lines = []
    for name, m in report.methods.items():
        vals = "  ".join(f"{k}={_fmt(v)}" for k, v in m["metrics"].items())
        lines.append(f"{name}: n={m['n']} dropped={m['dropped']}  {vals}")
    lines.append(f"wrote {', '.join(report.files.values())}")
    return lines


__all__ = ["EvalConfig", "EvalReport", "PredictionSet", "load_segment_tokenizer", "read_predictions",
           "render_markdown", "run_evaluation", "summary_lines"]
