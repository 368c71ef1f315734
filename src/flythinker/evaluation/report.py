"""Evaluating prediction files: metrics per method, paired CIs against a baseline, and the report files.

Owns: checking and reading the prediction files (one method per file; the method is the lines' "method" field or
the file stem; the records themselves are parsed by `flythinker.predictions.read_predictions`), checking that the
files describe the same examples, `EvalConfig` (what to compute; `from_dict` builds and validates it from
YAML-style keys), `run_evaluation` (metrics per method, position-sensitive segments, optional LLM judge, paired
bootstrap CIs of every method against a baseline) and the report files (metrics.json, report.md, segments.png).
The metric definitions live in `flythinker.evaluation.metrics`, the comparison in `.bootstrap`, segments in
`.segments`, the judge in `.judge`; the `evaluate` verb is `flythinker.cli.evaluate`.

What is refused, before anything is scored or written (each a one-line UserError naming the file(s) and an id):
a prediction path that is missing, a directory, a pipe or device, unreadable, binary or not UTF-8; the same file
given twice; two files of one method; files whose references differ for the same id (they are predictions of
different examples, and their scores cannot be compared); files that do not hold the same ids (unless
`common_ids`, which scores every file on the ids all share and says how many it left out); an empty reference in
"mean" mode; a `baseline_nonpers` or `difficulty_from` that names no method; an output folder that is a file or
device, or holds a directory where a report file goes.

The paper's analyses over the scored methods (`flythinker.evaluation.analyses`) go into the same report: the
average relative improvement over the Non-personalized row (Table 12 "Impr."; when such a row is among the inputs)
and every method's metrics per difficulty level (App. Q; levels from the untrained reference's per-example scores).
Outputs are written only when everything was computed, each atomically (temporary file + rename) under the output
folder's lock, so a kill never leaves half a report and a refused input writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, from_dict
from ..predictions import PredictionSet, read_predictions
from ..safeio import (
    atomic_write_text,
    check_output_dir,
    check_output_file,
    exclusive_lock,
    finite,
    special_kind,
)
from ..utils import UserError
from .bootstrap import paired_bootstrap
from .metrics import (DEFAULT_METRICS, METRIC_LABELS, Scores, bleu_length, check_metrics, prepare_pairs,
                      score_examples)
from .segments import DEFAULT_BOUNDARIES, DEFAULT_SEGMENT_METRICS, parse_boundaries, plot_segments, segment_scores


@dataclass
class EvalConfig:
    """What `flythinker evaluate` computes."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    mode: str = "mean"
    """"mean" (plain means; an empty prediction scores 0, an empty reference is an error) or "longlamp" (LongLaMP's
    compatibility mode: pairs with an empty side dropped and counted; ROUGE as LongLaMP reports it: seeded
    bootstrap median)."""
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
    common_ids: bool = False
    """Score every file on the ids all files share (printed and recorded with how many each file lost) instead of
    refusing files that do not hold the same ids."""
    baseline_nonpers: str | None = None
    """The Non-personalized method the "Impr." column (Table 12: mean relative improvement over the metrics, in %)
    is computed against (default: the method named "Non-personalized" / "nonpersonalized", if any; without one
    the column is left out)."""
    difficulty_from: str | None = "auto"
    """The untrained reference method whose per-example scores rank the examples into four difficulty levels
    (App. Q); every method is then scored per level. "auto": the Non-personalized row, else the RAG row, else
    no levels; "none" skips them."""

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
        if d.get("difficulty_from") is False:
            d["difficulty_from"] = None  # a bare `off` in YAML
        cfg = from_dict(cls, d, where)
        cfg.judge = _judge_config(judge_section, f"{where}.judge")
        return cfg.check(where)

    def check(self, where: str = "evaluation config") -> EvalConfig:
        """Validate every setting (also for an EvalConfig built in code), normalizing the metric lists; returns
        self. Runs before any file is read, so a bad setting costs nothing."""
        if self.segments:
            parse_boundaries(self.segments)  # fail on a bad spec before any scoring
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) or self.n_boot < 1:
            raise UserError(f"--n-boot must be an integer >= 1; got {self.n_boot!r}")
        finite(float(self.confidence), f"{where}: --confidence")
        if not 0 < self.confidence < 1:
            raise UserError(f"--confidence must be in (0, 1); got {self.confidence}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"--seed must be an integer >= 0; got {self.seed!r}")
        if self.bertscore_layers is not None and (not isinstance(self.bertscore_layers, int)
                                                  or self.bertscore_layers < 1):
            raise UserError(f"--bertscore-layers must be an integer >= 1; got {self.bertscore_layers!r}")
        if self.mode not in ("mean", "longlamp"):
            raise UserError(f"--mode must be 'mean' or 'longlamp'; got {self.mode!r}")
        for name in ("baseline_nonpers", "difficulty_from"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise UserError(f"--{name.replace('_', '-')} must be a method name; got {value!r}")
        if isinstance(self.difficulty_from, str) and self.difficulty_from.strip().lower() in ("", "none", "off"):
            self.difficulty_from = None
        self.metrics = check_metrics(self.metrics)
        self.segment_metrics = check_metrics(self.segment_metrics)
        return self


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
    difficulty: dict[str, Any] | None = None
    """The difficulty levels (App. Q) and every method's metrics per level, {"skipped": why}, or None (off)."""

    def as_dict(self) -> dict[str, Any]:
        return {"methods": self.methods, "segments": self.segments, "comparisons": self.comparisons,
                "difficulty": self.difficulty, "info": self.info, "files": self.files}


# ----------------------------------------------------------------------------------------------------------------
# reading and checking the inputs


def check_prediction_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The prediction paths as regular files, each given once: a missing path, a directory, a pipe (which would
    block the reader), a device or the same file twice (also under another name) is a UserError naming it."""
    if not paths:
        raise UserError("no prediction file given")
    seen: dict[tuple[int, int], Path] = {}
    out = []
    for p in map(Path, paths):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise UserError(f"{p}: prediction file not found") from None
        except OSError as e:
            raise UserError(f"{p}: cannot inspect the prediction file ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{p}: is {special_kind(p)}, not a prediction file (JSONL)")
        key = (st.st_dev, st.st_ino)
        if key in seen:
            also = "" if str(seen[key]) == str(p) else f" (also as {seen[key]})"
            raise UserError(f"{p}: prediction file given twice{also}; pass each file once")
        seen[key] = p
        out.append(p)
    return out


def read_prediction_file(path: Path) -> PredictionSet:
    """`read_predictions` (which names file and line for a bad byte, line or field), with an I/O failure while
    reading turned into a one-line error naming the file."""
    try:
        return read_predictions(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read the prediction file ({e.strerror})") from None


def _subset(s: PredictionSet, keep: set[str]) -> PredictionSet:
    """`s` restricted to the ids in `keep`, in its own order: every per-record list field is filtered alike."""
    rows = [k for k, i in enumerate(s.ids) if i in keep]
    n = len(s.ids)
    changes = {f.name: [getattr(s, f.name)[k] for k in rows] for f in dataclasses.fields(s)
               if isinstance(getattr(s, f.name), list) and len(getattr(s, f.name)) == n}
    return dataclasses.replace(s, **changes)


def align_examples(sets: Sequence[PredictionSet], common_ids: bool = False
                   ) -> tuple[list[PredictionSet], dict[str, Any]]:
    """Check that the files are predictions of the same examples; returns the sets to score and what was done.

    Ids: every file must hold the same ids as the first (a UserError naming both files, the counts and an example
    id) unless `common_ids`, which restricts every file to the ids all share (refused when they share none).
    References: on the ids two files share, the reference must be the same text (compared after stripping, as
    scored); a difference is a UserError naming both files, an example id and how many differ -- with no opt-out,
    since scores against different references are not comparable."""
    base = sets[0]
    id_sets = [set(s.ids) for s in sets]
    common = set.intersection(*id_sets)
    left_out = {s.method: len(s.ids) - len(common) for s in sets}
    if not common_ids:
        for s, ids in zip(sets[1:], id_sets[1:]):
            if ids == id_sets[0]:
                continue
            only_a = [i for i in base.ids if i not in ids]
            only_b = [i for i in s.ids if i not in id_sets[0]]
            parts = [f"{len(ids_)} id(s) only in {path} (e.g. {ids_[0]!r})" for ids_, path in
                     ((only_a, base.path), (only_b, s.path)) if ids_]
            raise UserError(f"{base.path} and {s.path} do not hold the same examples: {', '.join(parts)}; "
                            f"regenerate the missing predictions, or pass --common-ids to score every file on the "
                            f"{len(common)} id(s) all files share")
    elif not common:
        raise UserError(f"--common-ids: the files share no example id ({', '.join(str(s.path) for s in sets)})")
    elif any(left_out.values()):
        sets = [_subset(s, common) for s in sets]
        base = sets[0]
    ref_of = {i: (r or "").strip() for i, r in zip(base.ids, base.references)}
    for s in sets[1:]:
        differ = [i for i, r in zip(s.ids, s.references) if i in ref_of and (r or "").strip() != ref_of[i]]
        if differ:
            raise UserError(f"{base.path} and {s.path} have different references for id {differ[0]!r} "
                            f"({len(differ)} of {len(common)} shared ids differ); they are predictions of different "
                            f"examples and cannot be compared -- evaluate them separately")
    return list(sets), {"n": len(common), "common_ids": bool(common_ids), "left_out": left_out}


def check_references(s: PredictionSet, mode: str) -> None:
    """In "mean" mode every example needs its reference: an empty or missing one is a UserError naming the file
    and the first such id ("longlamp" drops such pairs and counts them)."""
    if mode != "mean":
        return
    missing = [i for i, r in zip(s.ids, s.references) if not (r or "").strip()]
    if missing:
        raise UserError(f"{s.path}: id {missing[0]!r} has an empty or missing reference ({len(missing)} such "
                        f"id(s)); --mode mean scores every example against its reference (--mode longlamp drops "
                        f"such pairs and counts them)")


REPORT_FILES = {"metrics": "metrics.json", "report": "report.md", "segments_plot": "segments.png"}


def check_out_dir(out_dir: Path, inputs: Sequence[Path]) -> None:
    """`out_dir` can take the report files: it (or, when absent, its nearest existing parent) is a directory, no
    report file there is a directory or device, and none of them is one of the input files."""
    check_output_dir(out_dir, "--out")
    parent = out_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--out {out_dir}: {parent} is not a directory")
    if not out_dir.is_dir():
        return
    for name in REPORT_FILES.values():
        target = check_output_file(out_dir / name, "--out")
        for p in inputs:
            if target.exists() and os.path.samefile(target, p):
                raise UserError(f"--out {out_dir}: {name} there is the input file {p}; refusing to overwrite it")


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

    tokenizer: an already-loaded Generator tokenizer for the segments (overrides cfg.tokenizer).

    Every input is checked first (see the module docstring) and every score computed (the judge first, so an
    unreachable judge fails before the expensive metrics); only then is `out_dir` created and written."""
    cfg = (cfg or EvalConfig()).check()
    metrics = cfg.metrics
    out_dir = Path(out_dir)
    paths = check_prediction_paths(paths)
    sets = [read_prediction_file(p) for p in paths]
    by_method: dict[str, Path] = {}
    for s in sets:
        if s.method in by_method:
            raise UserError(f"two files have method {s.method!r}: {by_method[s.method]} and {s.path}; set distinct "
                            f"\"method\" fields or file names")
        by_method[s.method] = s.path
    names = [s.method for s in sets]
    baseline = cfg.baseline or names[0]
    if baseline not in names:
        raise UserError(f"--baseline {baseline!r} is not one of the methods: {', '.join(names)}")
    nonpers, difficulty_ref = _analysis_methods(cfg, names)
    sets, examples = align_examples(sets, cfg.common_ids)
    for s in sets:
        check_references(s, cfg.mode)
    check_out_dir(out_dir, paths)
    seg_list = parse_boundaries(cfg.segments) if cfg.segments else None
    tok_desc = None
    if seg_list is not None and tokenizer is None and cfg.tokenizer:
        tokenizer, tok_desc = load_segment_tokenizer(cfg.tokenizer)  # before scoring: a bad folder costs nothing

    info: dict[str, Any] = {"mode": cfg.mode, "seed": cfg.seed, "metrics": list(metrics), "examples": examples,
                            "empty_predictions": EMPTY_RULE[cfg.mode]}
    judged: dict[str, Any] = {}
    if cfg.judge is not None:
        from .judge import judge

        info["judge"] = {"url": cfg.judge.url, "model": cfg.judge.model, "normalize": cfg.judge.normalize}
        for s in sets:
            preds, refs, kept = prepare_pairs(s.predictions, s.references, cfg.mode, s.ids)  # the pairs scored
            judged[s.method] = judge(cfg.judge, preds, refs, [s.inputs[k] for k in kept])

    scores: dict[str, Scores] = {}
    methods: dict[str, dict[str, Any]] = {}
    for s in sets:
        sc = score_examples(s.predictions, s.references, metrics=metrics, mode=cfg.mode, seed=cfg.seed, ids=s.ids,
                            bertscore_model=cfg.bertscore_model, bertscore_layers=cfg.bertscore_layers)
        scores[s.method] = sc
        methods[s.method] = {"file": str(s.path), "n": sc.n, "dropped": sc.dropped, "empty": sc.empty,
                             "metrics": {k: _num(v) for k, v in sc.values.items()}}
        if sc.bleu_stats is not None and len(sc.bleu_stats):
            # output/reference length and BLEU's brevity penalty: short outputs lose BLEU at any precision
            methods[s.method]["bleu_length"] = {k: _num(v) for k, v in bleu_length(sc.bleu_stats.sum(0)).items()}
        info.update({k: v for k, v in sc.info.items() if k not in ("mode", "seed")})
        if s.method in judged:  # judged on the same pairs, in the same order, as scored
            res = judged[s.method]
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

    if nonpers is not None:
        add_relative_improvement(methods, nonpers, list(metrics), info)
    difficulty = difficulty_report(scores, difficulty_ref, list(metrics)) if difficulty_ref is not None else None

    segments = None
    per_method = None
    files = {"metrics": str(out_dir / REPORT_FILES["metrics"]), "report": str(out_dir / REPORT_FILES["report"])}
    if seg_list is not None:
        seg_metrics = cfg.segment_metrics
        if tokenizer is None:
            segments = {"skipped": "no Generator tokenizer given (pass --tokenizer DIR)"}
        else:
            per_method = {s.method: segment_scores(s.predictions, s.references, tokenizer, seg_list,
                                                   metrics=seg_metrics, mode=cfg.mode, seed=cfg.seed,
                                                   bertscore_model=cfg.bertscore_model,
                                                   bertscore_layers=cfg.bertscore_layers)
                          for s in sets}
            files["segments_plot"] = str(out_dir / REPORT_FILES["segments_plot"])
            segments = {"boundaries": cfg.segments, "tokenizer": tok_desc or getattr(tokenizer, "name_or_path", "")
                        or type(tokenizer).__name__, "metrics": list(seg_metrics),
                        "methods": {m: [{k: _num(v) if isinstance(v, float) else v for k, v in row.items()}
                                        for row in rows] for m, rows in per_method.items()}}

    report = EvalReport(methods=methods, segments=segments, comparisons=comparisons, info=info, files=files,
                        scores=scores, difficulty=difficulty)
    _write_report(report, out_dir, per_method)
    return report


def _analysis_methods(cfg: EvalConfig, names: Sequence[str]) -> tuple[str | None, str | None]:
    """(the Non-personalized method for "Impr.", the reference of the difficulty levels), each None when off or
    not found; a name given explicitly that is not a method is a UserError (before anything is scored)."""
    from .analyses import find_difficulty_reference, find_nonpers

    for flag, value in (("--baseline-nonpers", cfg.baseline_nonpers), ("--difficulty-from", cfg.difficulty_from)):
        if value is not None and value != "auto" and value not in names:
            raise UserError(f"{flag} {value!r} is not one of the methods: {', '.join(names)}")
    nonpers = cfg.baseline_nonpers or find_nonpers(names)
    ref = cfg.difficulty_from
    if ref == "auto":
        ref = find_difficulty_reference(names)
    return nonpers, ref


def add_relative_improvement(methods: dict[str, dict[str, Any]], nonpers: str, metrics: list[str],
                             info: dict[str, Any]) -> None:
    """Table 12's "Impr.": `impr_over_nonpers` (%) on every method's row except the Non-personalized one, and what
    it is relative to in `info`."""
    from .analyses import impr_metrics, relative_improvement

    ref = methods[nonpers]["metrics"]
    used = impr_metrics(ref, metrics)
    for name, m in methods.items():
        if name != nonpers:
            m["impr_over_nonpers"] = relative_improvement(m["metrics"], ref, metrics)
    info["impr_over_nonpers"] = {
        "reference": nonpers, "metrics": used,
        "definition": "mean over the metrics of (method - reference) / reference, in percent (Table 12 'Impr.'); "
                      "metrics the reference scores 0 or NaN are left out"}


def difficulty_report(scores: dict[str, Scores], reference: str, metrics: list[str]) -> dict[str, Any]:
    """App. Q: levels from `reference`'s per-example scores (`analyses.difficulty_levels`), then every method's
    metrics on the examples of each level (means; BLEU corpus-level per level). An example the reference did not
    score ("longlamp" mode drops pairs) has no level. Fewer scored examples than levels: {"skipped": why}."""
    from .analyses import (
        DIFFICULTY_LABELS,
        DIFFICULTY_LEVELS,
        TIE_RULE,
        difficulty_levels,
        per_example_values,
        subset_values,
    )

    ref = scores[reference]
    n_levels = len(DIFFICULTY_LEVELS)
    if ref.n < n_levels:
        return {"reference": reference, "skipped": f"{reference} scored {ref.n} example(s), fewer than the "
                                                   f"{n_levels} difficulty levels"}
    levels, agg = difficulty_levels(per_example_values(ref, metrics), n_levels)
    level_of = {i: int(k) for i, k in zip(ref.ids, levels)}
    rows = []
    for k, name in enumerate(DIFFICULTY_LEVELS):
        a = agg[levels == k]
        rows.append({"level": name, "label": DIFFICULTY_LABELS[name], "n": len(a),
                     "score_min": float(a.min()), "score_max": float(a.max())})
    per_method: dict[str, list[dict[str, Any]]] = {}
    for method, sc in scores.items():
        by_level: list[list[int]] = [[] for _ in range(n_levels)]
        for row, i in enumerate(sc.ids):
            if i in level_of:
                by_level[level_of[i]].append(row)
        per_method[method] = [{"level": DIFFICULTY_LEVELS[k], "n": len(r),
                               **{m: _num(v) for m, v in subset_values(sc, r, metrics).items()}}
                              for k, r in enumerate(by_level)]
    return {"reference": reference, "metrics": metrics, "normalization": "per-metric min-max across the "
            "reference's examples, averaged over the metrics; higher = easier", "ties": TIE_RULE,
            "levels": rows, "methods": per_method}


def _write_report(report: EvalReport, out_dir: Path, per_method: dict[str, Any] | None) -> None:
    """Create `out_dir` and write the plot, metrics.json and report.md, each atomically, under the folder's lock
    (two evaluations into one folder never interleave their files)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot create the folder ({e.strerror})") from None
    with exclusive_lock(out_dir, "--out"):
        try:
            if per_method is not None:
                plot_segments(per_method, out_dir / REPORT_FILES["segments_plot"],
                              metrics=list(report.segments["metrics"]), title="Position-sensitive evaluation")
            atomic_write_text(out_dir / REPORT_FILES["metrics"],
                              json.dumps(report.as_dict(), indent=2, sort_keys=False) + "\n")
            atomic_write_text(out_dir / REPORT_FILES["report"], render_markdown(report))
        except OSError as e:
            raise UserError(f"--out {out_dir}: cannot write the report ({e.strerror or e})") from None


EMPTY_RULE = {
    "mean": "scored 0 on every metric (BLEU: an empty hypothesis; judge: the rubric's lowest score)",
    "longlamp": "pairs with an empty prediction or reference dropped before scoring (LongLaMP), counted in dropped",
}
"""What each mode does with an empty prediction, as metrics.json records it (info.empty_predictions)."""


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
    longlamp = info["mode"] == "longlamp"
    if longlamp:
        total = sum(m["dropped"] for m in report.methods.values())
        lines.append(f"- Pre-processing (LongLaMP compatibility mode): both sides stripped; pairs with an empty "
                     f"prediction or reference dropped before scoring: {total} pair(s) over all methods (column "
                     f"*dropped*). `--mode mean` scores an empty prediction as 0 instead.")
    else:
        lines.append("- Pre-processing: both sides stripped; every pair scored. An empty prediction scores 0 on "
                     "every metric (BLEU counts it as an empty hypothesis; the judge gives it the rubric's lowest "
                     "score), column *empty*; an empty reference is refused.")
    ex = info.get("examples")
    if ex and ex.get("common_ids") and any(ex["left_out"].values()):
        lost = ", ".join(f"{k} {v}" for k, v in ex["left_out"].items())
        lines.append(f"- Examples: `--common-ids`: every method scored on the {ex['n']} ids all files share; ids "
                     f"left out per method: {lost}.")
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
    impr = info.get("impr_over_nonpers")
    if impr:
        used = ", ".join(METRIC_LABELS.get(m, m) for m in impr["metrics"]) or "none"
        lines.append(f"- Impr.: average relative improvement over `{impr['reference']}` (Table 12): the mean over "
                     f"{used} of (method − {impr['reference']}) / {impr['reference']}, in %.")
    count = "dropped" if longlamp else "empty"
    impr_col = [f"Impr. vs {impr['reference']}"] if impr else []
    len_cols = ["BLEU len ratio", "BLEU BP"] if any("bleu_length" in m for m in report.methods.values()) else []
    if len_cols:
        lines.append("- BLEU len ratio: output / reference tokens over the corpus (sacrebleu 13a); BLEU BP: its "
                     "brevity penalty, exp(1 − 1/ratio) below 1, which multiplies BLEU.")
    lines += ["", "## Scores", "", f"| method | n | {count} | " + " | ".join(
        [METRIC_LABELS.get(c, c) for c in cols] + impr_col + len_cols) + " |",
              "|---|---:|---:|" + "---:|" * (len(cols) + len(impr_col) + len(len_cols))]
    for name, m in report.methods.items():
        cells = [_fmt(m["metrics"].get(c)) for c in cols]
        if impr:
            cells.append(_pct(m.get("impr_over_nonpers")))
        if len_cols:
            bl = m.get("bleu_length") or {}
            cells += [_fmt(bl.get("ratio"), 3), _fmt(bl.get("bp"), 3)]
        lines.append(f"| {name} | {m['n']} | {m.get(count, 0)} | " + " | ".join(cells) + " |")
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
            rule = ("pairs empty on a side in a segment are dropped there" if longlamp else
                    "a pair counts in a segment when its reference reaches it; a prediction empty there scores 0")
            lines.append(f"Token segments {seg['boundaries']} of the tokenizer `{seg['tokenizer']}`; each segment "
                         f"scored separately ({rule}).")
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
    lines += _difficulty_markdown(report.difficulty)
    return "\n".join(lines).rstrip() + "\n"


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.2f}%"


def _difficulty_markdown(diff: dict[str, Any] | None) -> list[str]:
    """The difficulty-levels section of report.md: one table per metric, methods by level (Table 11's layout)."""
    if diff is None:
        return []
    lines = ["", "## Difficulty levels", ""]
    if "skipped" in diff:
        return lines + [f"Skipped: {diff['skipped']}."]
    levels = diff["levels"]
    used = ", ".join(METRIC_LABELS.get(m, m) for m in diff["metrics"])
    lines += [(f"Examples ranked by `{diff['reference']}`'s per-example scores ({diff['normalization']}; {used}) "
               f"and split into {len(levels)} levels; {diff['ties']}. Each level is scored on its examples only "
               f"(means; BLEU corpus-level per level)."), "",
              "| level | n | aggregated score of the reference |", "|---|---:|---|"]
    for r in levels:
        lines.append(f"| {r['level']} ({r['label']}) | {r['n']} | {_fmt(r['score_min'], 3)} – "
                     f"{_fmt(r['score_max'], 3)} |")
    lines.append("")
    head = "| method | " + " | ".join(f"{r['level']} {r['label']}" for r in levels) + " |"
    for metric in diff["metrics"]:
        lines += [f"**{METRIC_LABELS.get(metric, metric)}**", "", head, "|---|" + "---:|" * len(levels)]
        for name, rows in diff["methods"].items():
            lines.append(f"| {name} | " + " | ".join(f"{_fmt(r.get(metric))} (n={r['n']})" for r in rows) + " |")
        lines.append("")
    return lines


def summary_lines(report: EvalReport) -> list[str]:
    """What `flythinker evaluate` prints: one line per method (n, dropped in "longlamp" mode or empty predictions
    scored 0 in "mean" mode, every metric), notes on what was left out, then the files written."""
    longlamp = report.info["mode"] == "longlamp"
    lines = []
    for name, m in report.methods.items():
        vals = "  ".join(f"{k}={_fmt(v)}" for k, v in m["metrics"].items())
        count = f"dropped={m['dropped']}" if longlamp else f"empty={m.get('empty', 0)} (scored 0)"
        impr = f"  impr_over_nonpers={_pct(m['impr_over_nonpers'])}" if "impr_over_nonpers" in m else ""
        lines.append(f"{name}: n={m['n']} {count}  {vals}{impr}")
    if longlamp:
        total = sum(m["dropped"] for m in report.methods.values())
        if total:
            lines.append(f"note: --mode longlamp dropped {total} pair(s) with an empty prediction or reference "
                         f"before scoring (LongLaMP's pre-processing); --mode mean scores an empty prediction as 0")
    ex = report.info.get("examples")
    if ex and ex.get("common_ids") and any(ex["left_out"].values()):
        lost = ", ".join(f"{k} {v}" for k, v in ex["left_out"].items())
        lines.append(f"note: --common-ids: every method scored on the {ex['n']} ids all files share; ids left out: "
                     f"{lost}")
    lines.append(f"wrote {', '.join(report.files.values())}")
    return lines


__all__ = ["EMPTY_RULE", "REPORT_FILES", "EvalConfig", "EvalReport", "PredictionSet", "add_relative_improvement",
           "align_examples", "check_out_dir", "check_prediction_paths", "check_references", "difficulty_report",
           "load_segment_tokenizer", "read_prediction_file", "read_predictions", "render_markdown", "run_evaluation", "summary_lines"]
