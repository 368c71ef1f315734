"""Paired bootstrap comparison of two methods scored on the same examples: confidence intervals of A − B.

Owns: `PairedDiff` (one metric's observed difference, percentile interval and one-sided p-like number) and
`paired_bootstrap` (resample the examples both methods scored, paired by id, the same draws for every metric).
A per-example metric's value on a resample is the mean of its per-example scores; a corpus-level metric (a registry
entry with `corpus`, i.e. BLEU) is recomputed from the summed per-pair statistics. The metrics themselves are
`flythinker.evaluation.metrics`; LongLaMP's own seeded bootstrap median of ROUGE (an aggregation mode, not a
comparison) is `metrics.rouge_bootstrap_mid`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..utils import UserError
from .metrics import METRICS, Scores


@dataclass
class PairedDiff:
    """A − B on one metric over the examples both methods scored.

    diff: the observed difference on those examples (mean difference; for BLEU, corpus BLEU(A) − corpus BLEU(B)).
    lo / hi: the percentile bootstrap interval of the difference at `confidence`.
    p: fraction of bootstrap resamples where the difference is <= 0 -- a one-sided p-like number for "A > B"
        (small = A reliably better; near 1 = A reliably worse; 0.5 = no difference).
    """

    metric: str
    diff: float
    lo: float
    hi: float
    p: float
    n: int
    n_boot: int
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "diff": self.diff, "lo": self.lo, "hi": self.hi, "p": self.p, "n": self.n,
                "n_boot": self.n_boot, "confidence": self.confidence}


def paired_bootstrap(a: Scores, b: Scores, metrics: Iterable[str] | None = None, n_boot: int = 1000,
                     seed: int = 0, confidence: float = 0.95) -> dict[str, PairedDiff]:
    """Paired bootstrap CIs of A − B per metric, resampling the examples both scored (paired by id).

    Each resample draws n example ids with replacement (the same draw for A and B, which is what pairs them) and
    recomputes each metric on it: the mean for per-example metrics, corpus BLEU from the summed statistics for
    BLEU. Seeded (numpy Generator), so the same inputs give the same intervals. Examples whose per-example value
    is NaN for either method (e.g. an unparsed judge reply) are left out of that metric. An empty prediction is
    not left out: it is in `Scores` as its zeros (and, for BLEU, its empty-hypothesis statistics), the rule
    `flythinker.evaluation.metrics` scores it by."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    pos_b = {i: k for k, i in enumerate(b.ids)}
    if len(pos_b) != len(b.ids) or len(set(a.ids)) != len(a.ids):
        raise UserError("paired bootstrap needs unique example ids in each method")
    common = [i for i in a.ids if i in pos_b]
    if not common:
        raise UserError("the two methods have no scored example id in common; cannot pair them")
    pos_a = {i: k for k, i in enumerate(a.ids)}
    ia = np.array([pos_a[i] for i in common])
    ib = np.array([pos_b[i] for i in common])
    if metrics is None:
        metrics = [m for m in a.values if m in b.values]
    out: dict[str, PairedDiff] = {}
    for m in metrics:
        rng = np.random.default_rng(seed)  # same draws for every metric: one resample = one set of examples
        corpus = METRICS[m].corpus if m in METRICS else None
        if corpus is not None:  # corpus-level (BLEU): recompute from the summed statistics of each resample
            label = METRICS[m].label
            if a.bleu_stats is None or b.bleu_stats is None:
                raise UserError(f"{label} comparison needs the per-example {label} statistics of both methods")
            sa, sb = a.bleu_stats[ia], b.bleu_stats[ib]
            observed = corpus(sa.sum(0)) - corpus(sb.sum(0))
            counts = _bootstrap_counts(rng, len(common), n_boot)
            ca, cb = counts @ sa, counts @ sb                                            # (n_boot, 10)
            diffs = np.array([corpus(x) - corpus(y) for x, y in zip(ca, cb)])
            n = len(common)
        else:
            if m not in a.per_example or m not in b.per_example:
                raise UserError(f"metric {m!r} has no per-example scores in both methods")
            d = a.per_example[m][ia] - b.per_example[m][ib]
            d = d[~np.isnan(d)]
            n = len(d)
            if n == 0:
                continue
            observed = float(d.mean())
            counts = _bootstrap_counts(rng, n, n_boot)
            diffs = counts @ d / n
        alpha = (1 - confidence) / 2
        lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
        out[m] = PairedDiff(metric=m, diff=float(observed), lo=float(lo), hi=float(hi),
                            p=float(np.mean(diffs <= 0)), n=n, n_boot=n_boot, confidence=confidence)
    return out


def _bootstrap_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) how often each example is drawn in each resample (a multinomial draw of n items)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


__all__ = ["PairedDiff", "paired_bootstrap"]
