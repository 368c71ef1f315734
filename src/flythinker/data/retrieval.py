"""Which profile items go into the prompt: BM25 over the user's own history, recency, both (the newest item plus
BM25's picks), seeded random, all, or none.

Owns the per-task query extraction (what LongLaMP retrieves with: the product's description/summary, the paper
title and keywords, the post text; the whole input for generic data) and the per-task document text of an item.
Every ordering is deterministic: ties keep the profile's original (newest-first) order.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

from .schema import Example, item_text, item_title
from .store import INLINE, ProfileStore

_FLAGS = re.DOTALL | re.IGNORECASE
_REVIEW_DESC = re.compile(r'description\s*:?\s*"(.*?)"\s*\.?\s*(?:The summary|$)', _FLAGS)
_REVIEW_SUMMARY = re.compile(r'summary of the review text is\s*:?\s*"(.*)"', _FLAGS)
_PRODUCT_SUMMARY = re.compile(r'summary\s*:?\s*"(.*)"', _FLAGS)     # own data: '... with summary "..."'
_ABSTRACT_TITLE = re.compile(r'title\s*:?\s*"(.*?)"(?=\s*(?:using|with|,|\.|$))', _FLAGS)
_ABSTRACT_ITEMS = re.compile(r"items\s*:\s*(.*)$", _FLAGS)
_ABSTRACT_TITLED = re.compile(r"titled\s*:?\s*(.*)$", _FLAGS)
_TOPIC_POST = re.compile(r"\bpost\b\s*:?\s*(.*)$", _FLAGS)


def query_text(example: Example, task: str) -> str:
    """The part of the input that describes what to write, used as the BM25 query.

    product_review: the product description and review summary; abstract_generation: the paper title (after
    "title"/"titled" or the last colon) plus its keyword items; topic_writing: the post text after "post";
    generic: the whole input. Falls back to the whole input when the expected wording is absent.
    """
    s = example.input
    parts: list[str] = []
    if task == "product_review":
        summary = _REVIEW_SUMMARY.search(s) or _PRODUCT_SUMMARY.search(s)
        parts = [m.group(1) for m in (_REVIEW_DESC.search(s), summary) if m]
    elif task == "abstract_generation":
        m = _ABSTRACT_TITLE.search(s) or _ABSTRACT_TITLED.search(s)
        if m:
            parts.append(m.group(1))
        elif ":" in s:
            parts.append(s.rsplit(":", 1)[1])
        items = _ABSTRACT_ITEMS.search(s)
        if items and (not parts or items.group(1) not in parts[0]):
            parts.append(items.group(1))
    elif task == "topic_writing":
        m = _TOPIC_POST.search(s)
        if m:
            parts.append(m.group(1))
    parts = [p.strip() for p in parts if p and p.strip()]
    return " ".join(parts) if parts else s


def item_document(item: dict[str, Any], task: str) -> str:
    """The text BM25 indexes for one profile item (LongLaMP also indexes the rating and product description)."""
    fields = [item_title(item), item_text(item)]
    if task == "product_review":
        fields = [str(item.get("overall", "")), str(item.get("description", ""))] + fields
    return " ".join(f for f in fields if f)


def bm25_scores(query: str, documents: list[str]) -> list[float]:
    """BM25 (bm25s, Lucene variant, English stop words) score of each document for `query`."""
    import logging

    import bm25s  # lazily: optional dependency, and indexing is only needed when retrieval is bm25

    # bm25s logs one DEBUG line per index build; once any library lowers the root level (absl does) that floods
    # the CLI with a line per example.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if not documents:
        return []
    corpus = bm25s.tokenize(documents, stopwords="en", return_ids=False, show_progress=False)
    q = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
    if not any(corpus) or not q:
        return [0.0] * len(documents)
    index = bm25s.BM25()
    index.index(corpus, show_progress=False)
    q = [t for t in q if t in index.vocab_dict]       # unseen query words contribute nothing
    if not q:
        return [0.0] * len(documents)
    return [float(x) for x in index.get_scores(q)]


def _example_rng(seed: int, example_id: str) -> random.Random:
    # Python's hash() is salted per process; a digest keeps the draw identical across runs and workers.
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def select_profile(example: Example, task: str, retrieval: str = "bm25", k: int = 2,
                   seed: int = 0, store: ProfileStore | None = None) -> list[dict[str, Any]]:
    """The profile items to show, in prompt order, from `store` (default: the example's inline profile).

    bm25: highest score first, ties in profile order; recency: the first k of the newest-first profile;
    both: the newest item first, then the highest-scoring of the others (as bm25) up to k in all;
    random: k items drawn with a per-example seeded RNG, shown in profile order; all: the whole profile;
    none (or k == 0): nothing.
    """
    profile = (store or INLINE).profile(example)
    if retrieval == "none" or not profile:
        return []
    if retrieval == "all":
        return list(profile)
    k = min(k, len(profile))
    if k <= 0:
        return []
    if retrieval == "recency":
        return list(profile[:k])
    if retrieval == "random":
        picked = sorted(_example_rng(seed, example.id).sample(range(len(profile)), k))
        return [profile[i] for i in picked]
    if retrieval in ("bm25", "both"):
        scores = bm25_scores(query_text(example, task), [item_document(it, task) for it in profile])
        order = sorted(range(len(profile)), key=lambda i: (-scores[i], i))
        if retrieval == "both":
            # The newest item (index 0 of the newest-first profile) whatever its score, so BM25 cannot pick it twice.
            order = [0] + [i for i in order if i != 0]
        return [profile[i] for i in order[:k]]
    raise ValueError(f"unknown retrieval {retrieval!r}")


__all__ = ["bm25_scores", "item_document", "query_text", "select_profile"]
