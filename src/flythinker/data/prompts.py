"""Prompt templates: one per LongLaMP task plus a generic one, rendered through the tokenizer's chat template
(system + user message, generation prompt appended) or as plain text.

Owns `build_prompt` and the pieces it is made of: resolving the task, rendering the selected history items under
the shared profile budget, and cutting the query to its budget. The user message is the history block followed
by the example's input; with no selected items (retrieval "none", empty profile) it is the input alone.
Items show the user's own writing with its label (rating + summary, title, or post summary); a review's product
description is used for retrieval but left out of the prompt, so the budget goes to what the user wrote.
"""

from __future__ import annotations

import re
from typing import Any

from .config import DataConfig
from .retrieval import select_profile
from .schema import Example, check_task, item_text, item_title
from .truncate import count_tokens, share_budget, truncate_to_tokens

# Per task: the sentence introducing the history block.
HISTORY_HEADERS = {
    "product_review": "Here are reviews this user wrote before:",
    "abstract_generation": "Here are abstracts of papers this author wrote before:",
    "topic_writing": "Here are posts this user wrote before:",
    "generic": "Here are texts this user wrote before:",
}


def resolve_task(cfg: DataConfig, example: Example) -> str:
    """The config's task, or the example's own (set by `load_examples`) when the config says auto."""
    return check_task(cfg.task) or check_task(example.task) or "generic"


def item_label(item: dict[str, Any], task: str, number: int) -> str:
    """The head of a rendered history item: '[n]' plus its rating/title/summary where it has one."""
    title = item_title(item)
    if task == "product_review":
        parts = ([f"Rating: {item['overall']}"] if "overall" in item else []) + ([f"Summary: {title}"] if title else [])
        label = " | ".join(parts)
    elif task == "abstract_generation":
        label = f"Title: {title}" if title else ""
    elif task == "topic_writing":
        label = f"Summary: {title}" if title else ""
    else:
        label = title
    return f"[{number}] {label}" if label else f"[{number}]"


def _sep(label: str) -> str:
    # A bare "[n]" stays on the text's line; a label with a title gets a line of its own.
    return " " if re.fullmatch(r"\[\d+\]", label) else "\n"


def render_item(item: dict[str, Any], task: str, number: int) -> str:
    """One history item: its label line, then its text."""
    label = item_label(item, task, number)
    return f"{label}{_sep(label)}{item_text(item)}"


def _fit_item(label: str, text: str, tokenizer: Any, allowance: int, length: int | None = None) -> str:
    """The rendered item within `allowance` tokens: the label is kept whole and the text is cut at sentence
    boundaries (cutting the whole string would let a short label line count as the 'first sentence')."""
    sep = _sep(label)
    full = f"{label}{sep}{text}"
    if (length if length is not None else count_tokens(full, tokenizer)) <= allowance:
        return full
    budget = allowance - count_tokens(label + sep, tokenizer)
    while budget > 0:
        cut = truncate_to_tokens(text, tokenizer, budget)
        if count_tokens(f"{label}{sep}{cut}", tokenizer) <= allowance:   # merges at the join can add a token
            return f"{label}{sep}{cut}" if cut else label
        budget -= 1
    return truncate_to_tokens(full, tokenizer, allowance)


def render_profile(items: list[dict[str, Any]], task: str, tokenizer: Any, cfg: DataConfig) -> list[str]:
    """Rendered items sharing `cfg.profile_tokens` (water-filling: items under an equal share stay whole, longer
    ones are cut at sentence boundaries to split the rest).

    At most profile_tokens // min_item_tokens items are kept (best first), so a large k or "all" shows fewer,
    readable items rather than many fragments. The header sentence and blank lines are not counted.
    """
    items = items[: max(1, cfg.profile_tokens // cfg.min_item_tokens)]
    parts = [(item_label(it, task, i + 1), item_text(it)) for i, it in enumerate(items)]
    lengths = [count_tokens(f"{label}{_sep(label)}{text}", tokenizer) for label, text in parts]
    allowances = share_budget(lengths, cfg.profile_tokens)
    out = [_fit_item(label, text, tokenizer, a, n)
           for (label, text), a, n in zip(parts, allowances, lengths, strict=True)]
    return [r for r in out if r.strip()]


def user_message(example: Example, tokenizer: Any, cfg: DataConfig, store: Any = None) -> str:
    """The user turn: selected history (under its budget) then the query (under its budget). `store`: a
    ProfileStore (default: the example's inline profile)."""
    task = resolve_task(cfg, example)
    items = select_profile(example, task, cfg.retrieval, cfg.k, cfg.seed, store=store)
    history = render_profile(items, task, tokenizer, cfg) if items else []
    query = truncate_to_tokens(example.input, tokenizer, cfg.query_tokens)
    if not history:
        return query
    return HISTORY_HEADERS[task] + "\n\n" + "\n\n".join(history) + "\n\n" + query


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(user: str, tokenizer: Any, cfg: DataConfig) -> str:
    """Wrap the user turn: the chat template with add_generation_prompt=True, or a plain-text layout."""
    system = cfg.system_prompt.strip()
    if cfg.use_chat_template and has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            if not system:
                raise
            # Some templates (e.g. Gemma's) reject a system role: fold it into the user turn instead.
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return (f"{system}\n\n" if system else "") + f"{user}\n\nResponse:\n"


def build_prompt(example: Example, tokenizer: Any, cfg: DataConfig, store: Any = None) -> str:
    """The full prompt text for `example` (ends where the response starts)."""
    return format_prompt(user_message(example, tokenizer, cfg, store=store), tokenizer, cfg)


__all__ = ["HISTORY_HEADERS", "build_prompt", "format_prompt", "has_chat_template", "item_label", "render_item",
           "render_profile", "resolve_task", "user_message"]
