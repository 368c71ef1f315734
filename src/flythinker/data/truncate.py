"""Token budgets: cut text to at most N tokens at a sentence boundary, and share one budget among several items.

Text that already fits is returned unchanged (the official script always dropped the last sentence; we do not).
When not even the first sentence fits, the text is hard-cut at the token budget. Counts use the model tokenizer
without special tokens, exactly as the text will later be encoded inside the prompt or target.
"""

from __future__ import annotations

import re
from typing import Any

# A sentence ends after . ! or ? (plus closing quotes/brackets) followed by whitespace, or at a paragraph break.
_SENTENCE = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+|\n[ \t]*\n\s*")
# Fallback when no whole sentence fits: a line break. Hard-wrapped prose (commit messages) and code put line
# breaks inside sentences, so these are only used after sentence ends failed, before a hard cut.
_LINE = re.compile(r"\n\s*")


def count_tokens(text: str, tokenizer: Any) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def sentence_ends(text: str, pattern: re.Pattern = _SENTENCE) -> list[int]:
    """Character offsets where a sentence-prefix of `text` may end (exclusive), increasing, excluding len(text)."""
    ends = sorted({m.end() for m in pattern.finditer(text)} - {len(text)})
    return [e for e in ends if text[:e].strip()]


def _longest_fitting_prefix(text: str, ends: list[int], tokenizer: Any, max_tokens: int) -> str | None:
    # Binary search over boundaries: the token count of a prefix grows with the prefix.
    lo, hi, best = 0, len(ends) - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if count_tokens(text[: ends[mid]].rstrip(), tokenizer) <= max_tokens:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return text[: ends[best]].rstrip() if best >= 0 else None


def _hard_cut(text: str, tokenizer: Any, max_tokens: int) -> str:
    """The longest character prefix whose encoding has <= max_tokens tokens, found from token offsets."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [e for _, e in enc["offset_mapping"]]
        n = max_tokens
        while n > 0:
            cut = text[: ends[n - 1]].rstrip()
            # Byte-level pieces of one character share its offsets, and merges can differ at the cut: verify.
            if count_tokens(cut, tokenizer) <= max_tokens:
                return cut
            n -= 1
        return ""
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = max_tokens
    while n > 0:
        cut = tokenizer.decode(ids[:n], skip_special_tokens=True).rstrip()
        if count_tokens(cut, tokenizer) <= max_tokens:
            return cut
        n -= 1
    return ""


def truncate_to_tokens(text: str, tokenizer: Any, max_tokens: int) -> str:
    """`text` cut to at most `max_tokens` tokens at the last sentence boundary that fits.

    Returns `text` itself when it fits; otherwise the longest whitespace-stripped prefix of whole sentences that
    fits, else of whole lines; a hard cut at the token budget when not even the first sentence or line fits;
    "" when max_tokens <= 0.
    """
    if max_tokens <= 0:
        return ""
    if count_tokens(text, tokenizer) <= max_tokens:
        return text
    for pattern in (_SENTENCE, _LINE):
        cut = _longest_fitting_prefix(text, sentence_ends(text, pattern), tokenizer, max_tokens)
        if cut is not None:
            return cut
    return _hard_cut(text, tokenizer, max_tokens)


def share_budget(lengths: list[int], budget: int) -> list[int]:
    """Water-filling: items that fit an equal share keep their full length; the rest split what remains evenly.

    lengths: token counts per item. Returns per-item allowances summing to <= budget.
    """
    alloc = [0] * len(lengths)
    remaining, left = budget, len(lengths)
    for i in sorted(range(len(lengths)), key=lambda j: (lengths[j], j)):
        alloc[i] = min(lengths[i], remaining // left)
        remaining -= alloc[i]
        left -= 1
    return alloc


__all__ = ["count_tokens", "sentence_ends", "share_budget", "truncate_to_tokens"]
