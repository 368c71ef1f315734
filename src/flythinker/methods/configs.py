"""The method-specific sections of `ModelArgs` (`model.coconut`, `model.interleaved`, ...), kept apart from the
method modules so `methods/base.py` can nest them without importing the methods (which import base)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, from_dict


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


__all__ = ["CoconutConfig", "InterleavedConfig"]
