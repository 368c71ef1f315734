"""The metric registry and the scoring entry points, with LongLaMP's exact conventions, computed offline.

Owns: `Metric` and the registry `METRICS` (every metric `score` computes: its key, label, scale and how it is
computed), `DEFAULT_METRICS` / `METRIC_LABELS` / `check_metrics` derived from it, the pre-processing of each mode
(`prepare_pairs`; LongLaMP's own is `clean_pairs`), the empty-prediction rule, `score` / `score_examples` / `Scores`,
and the metric functions: ROUGE-1 / ROUGE-L F1 (`rouge_score`, no stemmer), corpus BLEU (`sacrebleu` defaults: 13a,
exp smoothing, 0-100), METEOR (`nltk.translate.meteor_score`, alpha 0.9, beta 3, gamma 0.5, over
`word_tokenize`-equivalent tokens), BERTScore F1 (`bert_score` with a local encoder folder, no baseline rescaling).
Adding a metric is one `Metric` entry in `METRICS` (its `score` function returns a `Computed`, and gives
an empty prediction 0: `ScoreRequest.fill_empty`).

Not here: the external resources these metrics load (WordNet, NLTK's tokenizers, the BERTScore encoder) are
`flythinker.evaluation.resources`; confidence intervals for the difference between two methods are
`flythinker.evaluation.bootstrap`.

Every metric is a direct call of its reference library with LongLaMP's settings (see shared/reference/facts.md (c));
nothing is re-implemented. Heavy libraries (nltk, bert_score, rouge_score, sacrebleu) are imported lazily.

Pre-processing and empty predictions (`mode`):
- "mean" (the default): both sides are stripped and every pair is scored. A prediction that is empty after stripping
  (None, "", whitespace) is a method that wrote nothing, so it scores 0 on every metric: ROUGE-1/ROUGE-L F1 0,
  METEOR 0, BERTScore F1 0 (the reference libraries are not called for it), and BLEU counts it as an empty
  hypothesis (no n-gram matches, no hypothesis length, its reference length still in the brevity penalty -- exactly
  what `sacrebleu.corpus_bleu` does with an "" line). Dropping such pairs instead would let a method raise its score
  by writing nothing where it would be wrong. An empty or missing reference is a UserError naming the example:
  there is nothing to score against, and silently skipping it would change the example set per method.
  `Scores.empty` counts the empty predictions.
- "longlamp": LongLaMP's compatibility mode: strip both sides and drop pairs with an empty side before scoring
  (`clean_pairs`), counted in `Scores.dropped`; the report and the printed summary say how many.

Aggregation (`mode`):
- "mean": every per-example metric is the plain mean over the scored pairs, zeros of empty predictions included
  (deterministic).
- "longlamp": ROUGE is what HF `evaluate` reports for LongLaMP: the median (`.mid`) of rouge_score's
  BootstrapAggregator(n_samples=1000) -- here seeded, so it is reproducible. The requested ROUGE keys share one
  aggregator (so one random stream, in the requested order), exactly as `evaluate` does. METEOR and BERTScore are
  plain means in both modes (that is what LongLaMP/`evaluate` do), and BLEU is always corpus-level.

METEOR tokenisation: `nltk.word_tokenize`'s pipeline (Punkt sentence splitting, then NLTKWordTokenizer per
sentence) with the splitter `resources.sentence_splitter` provides: NLTK's trained English Punkt when `punkt_tab`
is installed, else an untrained Punkt splitter, which differs only around periods after abbreviations and initials
(how much that moves METEOR: docs/metrics.md). `meteor_tokenizer_kind()` says which is in use and reports record it.

BERTScore: the encoder is a local folder (`resources.resolve_bertscore_model`; default the packaged
all-MiniLM-L6-v2 at its last layer). Scores are comparable only between runs that used the same encoder + layer.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..utils import UserError
from . import resources

Mode = Literal["mean", "longlamp"]

# LongLaMP / HF evaluate METEOR parameters.
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5
LONGLAMP_BOOTSTRAP_SAMPLES = 1000


# ----------------------------------------------------------------------------------------------------------------
# results


@dataclass
class Scores:
    """Scores of one set of (prediction, reference) pairs.

    values: the aggregate per requested metric (ROUGE/METEOR/BERTScore 0-1, BLEU 0-100).
    per_example: per scored pair, for every requested metric except BLEU (corpus-level: see `bleu_stats`).
    bleu_stats: (n, 10) sacrebleu sufficient statistics per pair [sys_len, ref_len, correct_1..4, total_1..4];
        corpus BLEU of any subset/resample = `bleu_from_stats(stats.sum(0))`.
    ids: the id of each scored pair (the caller's ids, or input positions), aligned with per_example rows.
    n / dropped: pairs scored / pairs dropped because a side was empty after stripping ("longlamp" mode only;
        always 0 in "mean" mode, which scores every pair).
    empty: scored pairs whose prediction was empty after stripping, each scored 0 ("mean" mode; 0 in "longlamp").
    info: provenance: mode, seed, METEOR tokenizer, BERTScore encoder and layer.
    """

    values: dict[str, float]
    per_example: dict[str, np.ndarray]
    ids: list[Any]
    n: int
    dropped: int
    bleu_stats: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    empty: int = 0

    def as_dict(self) -> dict[str, Any]:
        """`{metric: float, ..., "n": int, "dropped": int}` -- the shape `score` returns."""
        return {**{k: float(v) for k, v in self.values.items()}, "n": self.n, "dropped": self.dropped}


# ----------------------------------------------------------------------------------------------------------------
# ROUGE


@functools.lru_cache(maxsize=4)
def _rouge_scorer(keys: tuple[str, ...]):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(keys), use_stemmer=False)


def rouge_scores(preds: Sequence[str], refs: Sequence[str], keys: Sequence[str] = ("rouge1", "rougeL")) -> list:
    """rouge_score Score tuples (precision, recall, fmeasure) per pair: `RougeScorer(keys, use_stemmer=False)
    .score(target=ref, prediction=pred)`, the default tokenizer (lowercase, [a-z0-9]+ runs)."""
    scorer = _rouge_scorer(tuple(keys))
    return [scorer.score(r, p) for p, r in zip(preds, refs)]


def rouge_bootstrap_mid(rows: Sequence[dict], keys: Sequence[str], seed: int = 0,
                        n_samples: int = LONGLAMP_BOOTSTRAP_SAMPLES) -> dict[str, float]:
    """LongLaMP's reported ROUGE: BootstrapAggregator(n_samples=1000).aggregate()[key].mid.fmeasure.

    This is how LongLaMP aggregates ROUGE (mode "longlamp"), not a comparison of methods (that is
    `flythinker.evaluation.bootstrap`). The aggregator draws from numpy's global RNG; we seed it for
    reproducibility and restore the caller's state afterwards so scoring has no side effect on other random
    streams."""
    from rouge_score import scoring

    state = np.random.get_state()
    try:
        np.random.seed(seed % (2**32))
        agg = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=n_samples)
        for row in rows:
            agg.add_scores({k: row[k] for k in keys})
        result = agg.aggregate()
    finally:
        np.random.set_state(state)
    return {k: float(result[k].mid.fmeasure) for k in keys}


# ----------------------------------------------------------------------------------------------------------------
# BLEU


@functools.lru_cache(maxsize=1)
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU()  # sacrebleu defaults: 13a, exp smoothing, no lowercasing, max order 4


def bleu_stats(preds: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """(n, 10) per-pair sufficient statistics [sys_len, ref_len, correct_1..4, total_1..4] (13a tokenisation).

    Each row is the corpus statistics of a one-pair corpus, so any sum of rows gives the same corpus BLEU as
    `sacrebleu.corpus_bleu` over those pairs."""
    bleu = _bleu()
    order = bleu.max_ngram_order
    out = np.zeros((len(preds), 2 + 2 * order), dtype=np.int64)
    for i, (p, r) in enumerate(zip(preds, refs)):
        s = bleu.corpus_score([p], [[r]])
        out[i, 0], out[i, 1] = s.sys_len, s.ref_len
        out[i, 2:2 + order] = s.counts
        out[i, 2 + order:] = s.totals
    return out


def _bleu_score(stats: Sequence[int] | np.ndarray) -> Any:
    """sacrebleu's `BLEUScore` for summed statistics, with the same settings as `sacrebleu.corpus_bleu`."""
    from sacrebleu.metrics import BLEU

    bleu = _bleu()
    order = bleu.max_ngram_order
    s = [int(x) for x in stats]
    return BLEU.compute_bleu(correct=s[2:2 + order], total=s[2 + order:], sys_len=s[0], ref_len=s[1],
                             smooth_method=bleu.smooth_method, smooth_value=bleu.smooth_value,
                             effective_order=bleu.effective_order, max_ngram_order=order)


def bleu_from_stats(stats: Sequence[int] | np.ndarray) -> float:
    """Corpus BLEU (0-100) from summed statistics, with the same settings as `sacrebleu.corpus_bleu`."""
    return float(_bleu_score(stats).score)


def bleu_length(stats: Sequence[int] | np.ndarray) -> dict[str, float]:
    """BLEU's length terms from summed statistics: {"ratio": system / reference tokens (NaN without reference
    tokens), "bp": sacrebleu's brevity penalty}. The penalty multiplies the whole corpus BLEU, so a method whose
    outputs are short loses BLEU whatever its n-gram precision; this says how much."""
    sc = _bleu_score(stats)
    return {"ratio": sc.sys_len / sc.ref_len if sc.ref_len else float("nan"), "bp": float(sc.bp)}


def corpus_bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """`sacrebleu.corpus_bleu(preds, [refs]).score` (kept for symmetry; `score` uses the statistics path)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


# ----------------------------------------------------------------------------------------------------------------
# METEOR


def meteor_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)` without needing punkt data: sentence split, then NLTKWordTokenizer per sentence."""
    splitter, _ = resources.sentence_splitter()
    wt = resources.word_tokenizer()
    return [tok for sent in splitter.tokenize(text) for tok in wt.tokenize(sent)]


def meteor_tokenizer_kind() -> str:
    """Which sentence splitter `meteor_tokenize` uses (recorded in `Scores.info` and the report)."""
    return resources.sentence_splitter()[1]


def meteor_scores(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    """Per pair `meteor_score([tok(ref)], tok(pred), alpha=0.9, beta=3, gamma=0.5)` (HF evaluate / LongLaMP).
    `score` calls it only for non-empty predictions (an empty one scores 0 without it)."""
    if not preds:
        return []
    resources.ensure_wordnet()
    from nltk.translate.meteor_score import meteor_score

    return [float(meteor_score([meteor_tokenize(r)], meteor_tokenize(p), alpha=METEOR_ALPHA, beta=METEOR_BETA,
                               gamma=METEOR_GAMMA)) for p, r in zip(preds, refs)]


# ----------------------------------------------------------------------------------------------------------------
# BERTScore


def bertscore_f1(preds: Sequence[str], refs: Sequence[str], model_dir: str | os.PathLike, layers: int,
                 batch_size: int = 16, device: str | None = None) -> list[float]:
    """Per-pair BERTScore F1: bert_score with model_type=<local folder>, num_layers=layers, no idf, no rescaling.
    `score` calls it only for non-empty predictions (an empty one scores 0 without it)."""
    if not preds:
        return []
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = resources.bert_scorer(Path(model_dir), int(layers), device)
    _, _, f1 = scorer.score(list(preds), list(refs), batch_size=batch_size)
    return [float(x) for x in f1.tolist()]



# ----------------------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class ScoreRequest:
    """What a metric's `score` function is asked: the prepared pairs and the options.

    Both sides are stripped and every reference is non-empty; a prediction may be "" ("mean" mode), and must then
    score 0 (BLEU: an empty hypothesis). `nonempty` and `fill_empty` do that for per-example metrics."""

    preds: list[str]
    refs: list[str]
    mode: Mode = "mean"
    seed: int = 0
    bertscore_model: str | os.PathLike | None = None
    bertscore_layers: int | None = None
    bertscore_batch_size: int = 16

    @property
    def n(self) -> int:
        return len(self.preds)

    @property
    def nonempty(self) -> list[int]:
        """Positions of the pairs whose prediction is not empty."""
        return [i for i, p in enumerate(self.preds) if p]

    def fill_empty(self, fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]]) -> np.ndarray:
        """One float per pair: `fn(preds, refs)` over the pairs with a non-empty prediction, 0.0 for the others
        (the empty-prediction rule). `fn` is not called when every prediction is empty."""
        out = np.zeros(self.n, dtype=np.float64)
        idx = self.nonempty
        if idx:
            out[idx] = np.asarray(fn([self.preds[i] for i in idx], [self.refs[i] for i in idx]), dtype=np.float64)
        return out


@dataclass
class Computed:
    """What a metric's `score` function returns for the requested metrics it computes.

    values: the aggregate per metric (NaN when there are no pairs). per_example: one float per pair, for
    per-example metrics. bleu_stats: per-pair sufficient statistics of the corpus-level metric (BLEU).
    info: provenance the function adds to `Scores.info` (tokenizer, encoder, ...)."""

    values: dict[str, float]
    per_example: dict[str, np.ndarray] = field(default_factory=dict)
    bleu_stats: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


ScoreFn = Callable[[ScoreRequest, tuple[str, ...]], Computed]


@dataclass(frozen=True)
class Metric:
    """One metric: the key `score` returns it under, how reports name it, its range, and how it is computed."""

    name: str
    label: str
    """How tables and plots name it ("ROUGE-1")."""
    scale: str
    """The range of its values: "0-1" or "0-100"."""
    score: ScoreFn | None
    """(request, names) -> Computed. Requested metrics that share one function are computed in one call, `names`
    in the requested order (ROUGE-1 and ROUGE-L share the tokenisation and, in "longlamp" mode, one bootstrap).
    None for a metric that `score` does not compute (the LLM judge)."""
    corpus: Callable[[np.ndarray], float] | None = None
    """Corpus-level metrics only (BLEU): the value of summed per-pair statistics (`Scores.bleu_stats`), which the
    paired bootstrap recomputes on every resample. None: a per-example metric, aggregated by its mean."""


def per_example_metric(fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
                       info: Callable[[], dict[str, Any]] | None = None) -> ScoreFn:
    """A `Metric.score` for a per-example metric aggregated by its plain mean: `fn(preds, refs)` gives one float
    per pair (it is called only for non-empty predictions; an empty one scores 0); `info()` (optional) the
    provenance to record."""

    def score_fn(req: ScoreRequest, names: tuple[str, ...]) -> Computed:
        (name,) = names
        per = req.fill_empty(fn)
        return Computed(values={name: _mean(per)}, per_example={name: per}, info=info() if info else {})

    return score_fn


def _score_rouge(req: ScoreRequest, names: tuple[str, ...]) -> Computed:
    idx = req.nonempty
    rows = rouge_scores([req.preds[i] for i in idx], [req.refs[i] for i in idx], names)
    per = {k: np.zeros(req.n, dtype=np.float64) for k in names}  # an empty prediction: F1 0
    for k in names:
        if idx:
            per[k][idx] = [r[k].fmeasure for r in rows]
    if req.mode == "longlamp" and req.n:  # "longlamp" pairs are never empty: `rows` is every pair, in order
        values = rouge_bootstrap_mid(rows, names, seed=req.seed)
    else:
        values = {k: _mean(per[k]) for k in names}
    return Computed(values=values, per_example=per)


def _score_bleu(req: ScoreRequest, names: tuple[str, ...]) -> Computed:
    stats = bleu_stats(req.preds, req.refs)  # an empty prediction: an empty hypothesis (ref_len only)
    return Computed(values={"bleu": bleu_from_stats(stats.sum(0)) if req.n else math.nan}, bleu_stats=stats)


def _score_bertscore(req: ScoreRequest, names: tuple[str, ...]) -> Computed:
    model = resources.resolve_bertscore_model(req.bertscore_model)  # even for zero pairs: a bad folder is an error
    layers = req.bertscore_layers or resources.default_bertscore_layers(model)
    per = req.fill_empty(lambda p, r: bertscore_f1(p, r, model, layers, batch_size=req.bertscore_batch_size))
    return Computed(values={"bertscore": _mean(per)}, per_example={"bertscore": per},
                    info={"bertscore_model": str(model), "bertscore_layers": layers})


def _meteor_info() -> dict[str, Any]:
    return {"meteor_tokenizer": meteor_tokenizer_kind()}


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("rouge1", "ROUGE-1", "0-1", _score_rouge),
    Metric("rougeL", "ROUGE-L", "0-1", _score_rouge),
    Metric("bleu", "BLEU", "0-100", _score_bleu, corpus=bleu_from_stats),
    Metric("meteor", "METEOR", "0-1", per_example_metric(meteor_scores, info=_meteor_info)),
    Metric("bertscore", "BERTScore", "0-1", _score_bertscore),
)}
"""Every metric `score` computes, under its key, in the order they are computed and reported."""
EXTERNAL_METRICS: dict[str, Metric] = {
    "judge": Metric("judge", "LLM judge", "0-1", None),  # `flythinker.evaluation.judge`, added by the report
}
"""Metrics reports show but `score` does not compute."""
DEFAULT_METRICS: tuple[str, ...] = tuple(METRICS)
METRIC_LABELS: dict[str, str] = {m.name: m.label for m in (*METRICS.values(), *EXTERNAL_METRICS.values())}


# ----------------------------------------------------------------------------------------------------------------
# public entry points


def score(predictions: Sequence[str | None], references: Sequence[str | None],
          metrics: Iterable[str] = DEFAULT_METRICS, mode: Mode = "mean", seed: int = 0,
          bertscore_model: str | os.PathLike | None = None, bertscore_layers: int | None = None) -> dict[str, Any]:
    """Score predictions against references with LongLaMP's metric settings.

    Returns one float per requested metric under the same keys, plus "n" (pairs scored) and "dropped" (pairs with
    an empty side, dropped in "longlamp" mode only). In "mean" mode an empty prediction scores 0 and an empty
    reference is a UserError (see the module docstring). Metrics of zero scored pairs are NaN."""
    return score_examples(predictions, references, metrics=metrics, mode=mode, seed=seed,
                          bertscore_model=bertscore_model, bertscore_layers=bertscore_layers).as_dict()


def score_examples(predictions: Sequence[str | None], references: Sequence[str | None],
                   metrics: Iterable[str] = DEFAULT_METRICS, mode: Mode = "mean", seed: int = 0,
                   ids: Sequence[Any] | None = None, bertscore_model: str | os.PathLike | None = None,
                   bertscore_layers: int | None = None, bertscore_batch_size: int = 16) -> Scores:
    """Like `score`, but keeps the per-example scores (and ids) needed for bootstrap comparisons: in "mean" mode
    one row per input pair (zeros for empty predictions), in "longlamp" mode one per pair kept."""
    metrics = check_metrics(metrics)
    if mode not in ("mean", "longlamp"):
        raise UserError(f"mode must be 'mean' or 'longlamp'; got {mode!r}")
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} references")
    if ids is not None and len(ids) != len(predictions):
        raise UserError(f"{len(ids)} ids but {len(predictions)} predictions")
    preds, refs, kept = prepare_pairs(predictions, references, mode, ids)
    kept_ids = [ids[i] if ids is not None else i for i in kept]
    req = ScoreRequest(preds, refs, mode=mode, seed=seed, bertscore_model=bertscore_model,
                       bertscore_layers=bertscore_layers, bertscore_batch_size=bertscore_batch_size)
    values: dict[str, float] = {}
    per: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"mode": mode, "seed": seed}
    stats = None
    for score_fn, names in _groups(metrics):
        got = score_fn(req, names)
        values.update(got.values)
        per.update(got.per_example)
        info.update(got.info)
        if got.bleu_stats is not None:
            stats = got.bleu_stats
    ordered = {m: values[m] for m in metrics}
    return Scores(values=ordered, per_example=per, ids=kept_ids, n=req.n, dropped=len(predictions) - req.n,
                  bleu_stats=stats, info=info, empty=sum(not p for p in preds))


def _groups(metrics: Sequence[str]) -> list[tuple[ScoreFn, tuple[str, ...]]]:
    """The requested metrics grouped by their `score` function: groups in registry order, names in the requested
    order within a group."""
    groups: dict[ScoreFn, list[str]] = {}
    for m in METRICS.values():
        if m.name in metrics and m.score is not None:
            groups.setdefault(m.score, [])
    for name in metrics:
        groups[METRICS[name].score].append(name)  # type: ignore[index]
    return [(fn, tuple(names)) for fn, names in groups.items()]


def check_metrics(metrics: Iterable[str] | str) -> tuple[str, ...]:
    """Validate metric names (a comma-separated string or an iterable); duplicates are removed, order is kept."""
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    out: list[str] = []
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"unknown metric {m!r}; valid: {', '.join(METRICS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise UserError(f"no metric requested; valid: {', '.join(METRICS)}")
    return tuple(out)


def prepare_pairs(predictions: Sequence[str | None], references: Sequence[str | None], mode: Mode = "mean",
                  ids: Sequence[Any] | None = None) -> tuple[list[str], list[str], list[int]]:
    """The pairs `score` scores: (stripped predictions, stripped references, indices of those pairs in the input).

    "mean": every pair, an empty prediction kept as "" (it scores 0); an empty or missing reference is a UserError
    naming the first such example (its id, else its position) and how many there are. "longlamp": `clean_pairs`."""
    if mode == "longlamp":
        return clean_pairs(predictions, references)
    refs = [(r or "").strip() for r in references]
    missing = [i for i, r in enumerate(refs) if not r]
    if missing:
        i = missing[0]
        what = f"example {ids[i]!r}" if ids is not None else f"pair {i}"
        raise UserError(f"the reference of {what} is empty or missing ({len(missing)} such pair(s)); mode 'mean' "
                        f"scores every pair against its reference (mode 'longlamp' drops such pairs and counts "
                        f"them)")
    return [(p or "").strip() for p in predictions], refs, list(range(len(refs)))


def clean_pairs(predictions: Sequence[str | None], references: Sequence[str | None]
                ) -> tuple[list[str], list[str], list[int]]:
    """LongLaMP pre-processing ("longlamp" mode): strip both sides, drop pairs where either side is None or empty.

    Returns (predictions, references, indices of the kept pairs in the input)."""
    preds, refs, kept = [], [], []
    for i, (p, r) in enumerate(zip(predictions, references)):
        p = (p or "").strip()
        r = (r or "").strip()
        if p and r:
            preds.append(p)
            refs.append(r)
            kept.append(i)
    return preds, refs, kept


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else math.nan


__all__ = [
    "DEFAULT_METRICS", "EXTERNAL_METRICS", "METRICS", "METRIC_LABELS", "Computed", "Metric", "Mode",
    "ScoreRequest", "Scores", "bertscore_f1", "bleu_from_stats", "bleu_stats", "check_metrics", "clean_pairs",
    "corpus_bleu", "meteor_scores", "meteor_tokenize", "meteor_tokenizer_kind", "per_example_metric", "prepare_pairs",
    "rouge_bootstrap_mid", "rouge_scores", "score", "score_examples",
]
