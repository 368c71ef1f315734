"""The method-specific sections of `ModelArgs` (`model.coconut`, `model.interleaved`, ...), kept apart from the
method modules so `methods/base.py` can nest them without importing the methods (which import base)."""

from __future__ import annotations

import dataclasses
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

    def __post_init__(self) -> None:
        if isinstance(self.latents, bool) or not isinstance(self.latents, int) or self.latents < 0:
            raise ConfigError(f"coconut.latents must be an integer >= 0; got {self.latents!r}")
        if not isinstance(self.rescale, bool):
            raise ConfigError(f"coconut.rescale must be true or false; got {self.rescale!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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


__all__ = ["CoTConfig", "CoconutConfig", "InterleavedConfig"]
