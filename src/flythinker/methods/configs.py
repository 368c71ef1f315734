"""The method-specific sections of `ModelArgs` (`model.coconut`, `model.interleaved`, `model.cot`, `model.cos`,
`model.trsr`, `model.nextquill`), kept apart from the method modules so `methods/base.py` can nest them without
importing the methods (which import base)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, from_dict
from .teachers import TeacherConfig


@dataclass
class CoconutConfig:
    """Coconut's settings (the `model.coconut` section)."""

    latents: int = 4
    """c, the continuous thoughts between the prompt and the response (0: just <bot><eot>)."""
    rescale: bool = False
    """Rescale each fed-back hidden state to the mean L2 norm of the Generator's embedding rows. Off by default, as
    published; on is the fix for Coconut's known large-norm thoughts (final-layer states are far larger than token
    embeddings, so an unscaled thought dominates the residual stream of an untrained model)."""
    curriculum: bool = False
    """Coconut's curriculum from a teacher's reasoning (off by default: every step trains the last stage, c
    thoughts). On: the training features hold every stage k = 0..`stages` of each example, trained in order; stage
    k replaces the first k reasoning sentences by k·c thoughts, the last stage keeps no language reasoning, and
    the trained model then thinks c·`stages` thoughts (methods/coconut.py, docs/coconut.md)."""
    stages: int = 5
    """K, the curriculum's last stage (curriculum only): stages 0..K, K·c thoughts after it. Default 5, the most
    sentences the teachers write (extractive: 2-5; self / endpoint are asked for 2 to 5)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Where the curriculum's reasoning text comes from (flythinker.methods.teachers, cached as CoT's is)."""

    def __post_init__(self) -> None:
        if isinstance(self.latents, bool) or not isinstance(self.latents, int) or self.latents < 0:
            raise ConfigError(f"coconut.latents must be an integer >= 0; got {self.latents!r}")
        if not isinstance(self.rescale, bool):
            raise ConfigError(f"coconut.rescale must be true or false; got {self.rescale!r}")
        if not isinstance(self.curriculum, bool):
            raise ConfigError(f"coconut.curriculum must be true or false; got {self.curriculum!r}")
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ConfigError(f"coconut.stages must be an integer >= 1; got {self.stages!r}")
        if isinstance(self.teacher, dict):
            self.teacher = from_dict(TeacherConfig, self.teacher, where="coconut teacher")
        if not isinstance(self.teacher, TeacherConfig):
            raise ConfigError(f"coconut.teacher must be a teacher section; got {self.teacher!r}")
        if self.curriculum and self.latents < 1:
            raise ConfigError("coconut.curriculum needs coconut.latents >= 1 (stage k replaces k sentences by k·c "
                              "thoughts)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.curriculum:
            # Unused without the curriculum: a checkpoint's record stays what it was before these settings existed.
            for key in ("curriculum", "stages", "teacher"):
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoconutConfig:
        return from_dict(cls, d, where="coconut config")


@dataclass
class InterleavedConfig:
    """The interleaved foil's settings (the `model.interleaved` section)."""

    every: int = 4
    """k: one thought before every k-th response token (before y_1, y_{k+1}, y_{2k+1}, ...)."""
    rescale: bool = True
    """Rescale each fed-back hidden state to the mean L2 norm of the Generator's embedding rows, as FlyThinker
    rescales the Reasoner's states (on by default, so the comparison isolates "separate and parallel" vs "same
    model, sequential" rather than the scale of the fed-back vector)."""

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"interleaved.every must be an integer >= 1; got {self.every!r}")
        if not isinstance(self.rescale, bool):
            raise ConfigError(f"interleaved.rescale must be true or false; got {self.rescale!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InterleavedConfig:
        return from_dict(cls, d, where="interleaved config")


@dataclass
class CoTConfig:
    """How CoT writes and bounds its reasoning (the `model.cot` section)."""

    max_reasoning_tokens: int = 128
    """Most reasoning tokens per row before the closing delimiter is forced (training texts are cut to it too);
    0 = no reasoning (the delimiters only)."""
    open_delimiter: str = "Reasoning:\n"
    """Appended to the prompt: the reasoning starts after it ("" = right after the prompt)."""
    close_delimiter: str = "\n\nResponse:\n"
    """Ends the reasoning; the response follows. Must not be empty or contain the EOS token."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Where the training reasoning comes from (flythinker.methods.teachers)."""

    def __post_init__(self) -> None:
        m = self.max_reasoning_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError(f"cot max_reasoning_tokens must be an integer >= 0; got {m!r}")
        if not isinstance(self.open_delimiter, str) or not isinstance(self.close_delimiter, str):
            raise ConfigError("cot delimiters must be strings")
        if not self.close_delimiter:
            raise ConfigError("cot close_delimiter must not be empty (it is how a row's reasoning ends)")
        if isinstance(self.teacher, dict):
            self.teacher = from_dict(TeacherConfig, self.teacher, where="cot teacher")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoTConfig:
        return from_dict(cls, d, where="cot config")


def _number(where: str, v: Any, low: float | None = None, strict: bool = False) -> float:
    """`v` as a finite float (>= low, or > low when strict); a ConfigError naming `where` otherwise."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if strict else v >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ConfigError(f"{where} must be a finite number{bound}; got {v!r}")
    return float(v)


class _Section:
    """to_dict / from_dict of a settings section, named for its errors."""

    _where = "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        return from_dict(cls, d, where=cls._where)


@dataclass
class CoSConfig(_Section):
    """Context steering's settings (the `model.cos` section)."""

    _where = "cos config"

    lam: float = 1.0
    """λ_cos: the next-token log-probabilities are lp_ctx + λ·(lp_ctx - lp_noctx). 0 is the plain RAG Generator,
    > 0 amplifies the history's influence, < 0 damps it (He et al. sweep λ over roughly -3..3 and report no single
    default; 1 doubles the influence the history already has)."""

    def __post_init__(self) -> None:
        self.lam = _number("cos.lam", self.lam)


@dataclass
class TRSRConfig(_Section):
    """LLM-TRSR's settings (the `model.trsr` section): where the history summary comes from and how it enters
    the prompt."""

    _where = "trsr config"

    summary_tokens: int = 128
    """Most tokens of the summary in the prompt (cut at a sentence boundary)."""
    summary_k: int = 8
    """History items the summary reads, selected by the data's retrieval (0 = the prompt's own k). More than the
    prompt shows, as LLM-TRSR summarises a longer history than it can quote."""
    header: str = "Summary of this user's past writing:"
    """The line above the summary in the user message (the summary block precedes the history and the query)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Who writes the summary (flythinker.methods.teachers: extractive default, self, endpoint), cached."""

    def __post_init__(self) -> None:
        for key in ("summary_tokens", "summary_k"):
            v = getattr(self, key)
            low = 1 if key == "summary_tokens" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"trsr.{key} must be an integer >= {low}; got {v!r}")
        if not isinstance(self.header, str):
            raise ConfigError(f"trsr.header must be a string; got {self.header!r}")
        if isinstance(self.teacher, dict):
            self.teacher = from_dict(TeacherConfig, self.teacher, where="trsr teacher")


@dataclass
class NextQuillConfig(_Section):
    """NextQuill's settings (the `model.nextquill` section): the token weight rule and the auxiliary term."""

    _where = "nextquill config"

    threshold: float = 0.05
    """A response token is preference-bearing when the history raises its probability by more than this:
    p(y_t | history, query, y_<t) - p(y_t | query, y_<t) > threshold (the released code's 0.05)."""
    high: float = 0.9
    """Weight of a preference-bearing token before normalisation (released code: 0.9)."""
    low: float = 0.1
    """Weight of any other token before normalisation (released code: 0.1). high = low is plain SFT weighting."""
    alpha: float = 0.1
    """Weight of the auxiliary causal-effect term: cross-entropy of softmax(z_hist - z_noctx) against y_t (the
    released code's 0.1); 0 turns it off."""

    def __post_init__(self) -> None:
        self.threshold = _number("nextquill.threshold", self.threshold)
        self.low = _number("nextquill.low", self.low, 0.0)
        self.high = _number("nextquill.high", self.high, 0.0, strict=True)
        self.alpha = _number("nextquill.alpha", self.alpha, 0.0)
        if self.high < self.low:
            raise ConfigError(f"nextquill.high ({self.high:g}) must be >= nextquill.low ({self.low:g}): "
                              f"preference-bearing tokens weigh at least as much as the others")


__all__ = ["CoSConfig", "CoTConfig", "CoconutConfig", "InterleavedConfig", "NextQuillConfig", "TRSRConfig"]
