"""The paper's analyses over scored methods: the average relative improvement over Non-personalized (Table 12
"Impr.") and the difficulty levels (App. Q, Table 11).

Owns: `relative_improvement` (one method's Impr. in %), `find_nonpers` (which method is the Non-personalized row),
`difficulty_levels` (rank examples by a reference method's normalised, aggregated per-example scores and split them
into equal-count levels), `per_example_values` / `subset_values` (a `Scores`' metrics per example and on a subset of
examples). `flythinker.evaluation.report.run_evaluation` calls them and writes the results into metrics.json and
report.md; docs/analyses.md explains what they mean.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from .metrics import METRICS, Scores

NONPERS_NAMES = frozenset({"nonpersonalized", "nonpers"})
"""Method names (lowercased, letters only) recognised as the Non-personalized row: "Non-personalized",
"nonpersonalized", "Non-pers", "non_pers", ..."""

DIFFICULTY_LEVELS = ("H0", "H1", "H2", "H3")
DIFFICULTY_LABELS = {"H0": "very hard", "H1": "hard", "H2": "medium", "H3": "easy"}
"""The paper's four levels (Table 11), hardest first."""

TIE_RULE = ("examples are sorted by their aggregated score, lowest (hardest) first, with equal scores kept in the "
            "reference file's order (a stable sort), then cut into levels of equal size; when the count does not "
            "divide evenly the first (harder) levels get one example more (10 examples: 3/3/2/2)")
"""How `difficulty_levels` breaks ties and splits uneven counts (recorded in metrics.json)."""


def _usable(v: float | None) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def relative_improvement(values: Mapping[str, float | None], reference: Mapping[str, float | None],
                         metrics: Sequence[str]) -> float | None:
    """Table 12's "Impr.": the mean over metrics of (m − m_ref) / m_ref, in percent.

    values / reference: metric -> aggregate (the method's and the Non-personalized row's), each on its own scale
    (BLEU 0-100, the others 0-1; a ratio does not depend on the scale). A metric the reference lacks, has as
    NaN/None, or scores 0 (no ratio exists) is left out of the mean for every method alike; None when no metric
    is left, or when the method lacks a value for one of the metrics that are left (its mean would be over other
    metrics than the other methods')."""
    used = impr_metrics(reference, metrics)
    if not used or any(not _usable(values.get(m)) for m in used):
        return None
    ratios = [(float(values[m]) - float(reference[m])) / float(reference[m]) for m in used]  # type: ignore[arg-type]
    return 100.0 * float(np.mean(ratios))


def impr_metrics(reference: Mapping[str, float | None], metrics: Sequence[str]) -> list[str]:
    """The metrics `relative_improvement` averages over: those the reference scores finite and non-zero."""
    return [m for m in metrics if _usable(reference.get(m)) and float(reference[m]) != 0.0]  # type: ignore[arg-type]


def normalized_name(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def find_nonpers(names: Sequence[str]) -> str | None:
    """The first method whose name is a Non-personalized name (`NONPERS_NAMES`), or None."""
    return next((n for n in names if normalized_name(n) in NONPERS_NAMES), None)


def find_difficulty_reference(names: Sequence[str]) -> str | None:
    """The default reference of the difficulty levels, the paper's "base Instruct model": the Non-personalized
    row, else the RAG row (an untrained model too, with retrieved history), else None."""
    return find_nonpers(names) or next((n for n in names if normalized_name(n) == "rag"), None)


def per_example_values(scores: Scores, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """metric -> (N,) one value per scored example of `scores` (rows of `scores.ids`). A corpus-level metric
    (BLEU) is its value on the one-example corpus (sentence BLEU with sacrebleu's smoothing), from the per-pair
    statistics."""
    out: dict[str, np.ndarray] = {}
    for m in metrics:
        corpus = METRICS[m].corpus if m in METRICS else None
        if corpus is not None:
            stats = scores.bleu_stats
            out[m] = np.array([corpus(row) for row in stats], dtype=np.float64) if stats is not None \
                else np.full(len(scores.ids), np.nan)
        else:
            out[m] = np.asarray(scores.per_example[m], dtype=np.float64)
    return out


def subset_values(scores: Scores, rows: Sequence[int], metrics: Sequence[str]) -> dict[str, float]:
    """metric -> its value on the examples at `rows` of `scores`: the mean of the per-example scores (NaN ones
    left out), or for a corpus-level metric (BLEU) the corpus value of the summed statistics. NaN for no rows."""
    idx = np.asarray(list(rows), dtype=np.int64)
    out: dict[str, float] = {}
    for m in metrics:
        corpus = METRICS[m].corpus if m in METRICS else None
        if not len(idx):
            out[m] = math.nan
        elif corpus is not None:
            out[m] = float(corpus(scores.bleu_stats[idx].sum(0))) if scores.bleu_stats is not None else math.nan
        else:
            x = np.asarray(scores.per_example[m], dtype=np.float64)[idx]
            x = x[~np.isnan(x)]
            out[m] = float(x.mean()) if len(x) else math.nan
    return out


def difficulty_levels(per_example: Mapping[str, np.ndarray], n_levels: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """App. Q: the difficulty level of every example from a reference method's per-example scores.

    Each metric is min-max normalised across the examples (a metric equal on every example contributes 0 to all,
    so it does not move the ranking), the normalised metrics are averaged per example, and the examples are
    ranked and cut into `n_levels` equal-count levels, level 0 the hardest (lowest score); see `TIE_RULE`.

    per_example: metric -> (N,) scores, higher is better (a NaN counts as the metric's minimum).
    Returns (levels (N,) int in [0, n_levels), aggregated score (N,) in [0, 1]).
    Raises ValueError for no metric, metrics of different lengths, or fewer examples than levels."""
    if not per_example:
        raise ValueError("difficulty levels need at least one metric")
    cols = [np.asarray(v, dtype=np.float64) for v in per_example.values()]
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise ValueError("every metric needs one score per example")
    if n_levels < 1 or n < n_levels:
        raise ValueError(f"{n} example(s) cannot be split into {n_levels} difficulty levels")
    X = np.stack(cols, axis=1)                                            # (N, M)
    lo = np.nanmin(X, axis=0)
    X = np.where(np.isnan(X), lo, X)
    span = X.max(axis=0) - X.min(axis=0)                                  # (M,)
    norm = np.where(span > 0, (X - X.min(axis=0)) / np.where(span > 0, span, 1.0), 0.0)
    agg = norm.mean(axis=1)                                               # (N,)
    order = np.argsort(agg, kind="stable")                                # hardest first; ties: input order
    levels = np.empty(n, dtype=np.int64)
    for k, chunk in enumerate(np.array_split(order, n_levels)):           # sizes differ by <= 1, larger first
        levels[chunk] = k
    return levels, agg


__all__ = ["DIFFICULTY_LABELS", "DIFFICULTY_LEVELS", "NONPERS_NAMES", "TIE_RULE", "difficulty_levels",
           "find_difficulty_reference", "find_nonpers", "impr_metrics", "normalized_name", "per_example_values",
           "relative_improvement", "subset_values"]
