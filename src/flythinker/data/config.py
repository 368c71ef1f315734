"""`DataConfig`: every knob of the data layer (task, profile retrieval, token budgets, prompt format) in one typed
dataclass. It is the `data:` section of training/generation configs and the `flythinker data inspect` flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError
from .schema import TASKS

Retrieval = Literal["bm25", "recency", "both", "random", "all", "none"]
RETRIEVALS: tuple[str, ...] = ("bm25", "recency", "both", "random", "all", "none")

DEFAULT_SYSTEM_PROMPT = (
    "You are a personalized writing assistant. Write the requested text as this user would write it, "
    "matching the style, tone, vocabulary, length and preferences shown in their past writing."
)


@dataclass
class DataConfig:
    """How examples become prompts and targets (defaults follow the FlyThinker data preparation)."""

    task: str = "auto"
    """Prompt template and query extraction: auto (from the data), product_review, abstract_generation,
    topic_writing or generic."""
    retrieval: Retrieval = "bm25"
    """Which profile items enter the prompt: bm25 (most relevant to the query), recency (newest), both (the
    newest item, then the most relevant others), random (seeded), all, or none (non-personalized)."""
    k: int = 2
    """How many profile items to select (ignored by "all"; 0 means none). The paper's main runs use 2."""
    profile_tokens: int = 1250
    """Token budget for the selected history items together (cut at sentence boundaries; what fits is kept)."""
    query_tokens: int = 300
    """Token budget for the query (the example's input)."""
    target_tokens: int = 1000
    """Token budget for the training target, before the EOS token is appended."""
    eos_after_cut: bool = True
    """Whether a target that `target_tokens` cut still ends in EOS. True: every target does (the paper's data
    preparation, where the budget of 1000 tokens cuts almost nothing). False: only a whole target does, so a small
    budget does not teach the model to stop where the cut fell (the reviews, cut at 192 tokens, taught every
    trained row to stop early)."""
    min_item_tokens: int = 64
    """Smallest share of the profile budget an item may get; fewer items are shown rather than slivers."""
    seed: int = 0
    """Seed for random retrieval (combined with each example's id, so every example draws its own sample)."""
    use_chat_template: bool = True
    """Render with the tokenizer's chat template (system + user message) when it has one; plain text otherwise."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System message (chat) or preamble (plain text); empty for none."""

    def __post_init__(self) -> None:
        if self.task not in ("auto", *TASKS):
            raise ConfigError(f"task must be one of auto, {', '.join(TASKS)}; got {self.task!r}")
        if self.retrieval not in RETRIEVALS:
            raise ConfigError(f"retrieval must be one of {', '.join(RETRIEVALS)}; got {self.retrieval!r}")
        if self.k < 0:
            raise ConfigError(f"k must be >= 0; got {self.k}")
        for name in ("profile_tokens", "query_tokens", "target_tokens", "min_item_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")


__all__ = ["DataConfig", "DEFAULT_SYSTEM_PROMPT", "RETRIEVALS", "Retrieval"]
