"""FlyThinker's fusion settings: how the Reasoner's latent states enter the Generator (paper Eq. 6, Appendix G).

The one definition of the fusion knobs: the model, the trainer's `model.fusion` section, study variants and
ablations all use this dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ...config import ConfigError, from_dict

Scope = Literal["global", "input", "output"]
WidthMode = Literal["project", "pad"]
Normalize = Literal["none", "center", "standardize"]
Gate = Literal["none", "scalar", "vector"]


@dataclass
class FlyThinkerConfig:
    """How the Reasoner's latent states are fused into the Generator (paper Eq. 6, Appendix G)."""

    lam: float = 0.5
    """λ, the strength of the latent reasoning signal (paper default 0.5)."""
    scope: Scope = "global"
    """Where r is added: all positions ("global", the paper's), prompt only ("input"), response only ("output")."""
    rescale: bool = True
    """Rescale each r_{i-1} to the mean L2 norm of the Generator's embedding rows before adding (official code)."""
    width_mode: WidthMode = "project"
    """When d_R != d_G: "project" = learned linear map initialised to the zero-padded add; "pad" = fixed zero-pad."""
    normalize: Normalize = "none"
    """Before the rescale, shift ("center") or shift and scale per dimension ("standardize") r by the untrained
    Reasoner's own mean / std over training tokens (`FlyThinker.calibrate`; the trainer does it; saved with the
    model). Not in the paper: R's final-layer states share one large common direction and a few massive dimensions,
    so rescaled they act as a near-constant, out-of-distribution offset on every embedding (docs/results.md)."""
    gate: Gate = "none"
    """Not in the paper: multiply λ·r by tanh(g), a learned gate initialised to 0 (as Flamingo gates its
    cross-attention), so training starts exactly at the plain Generator (the SFT model) and learns how much of r
    to let in. "scalar": one g; "vector": one g per Generator dimension; "none": no gate (the paper's Eq. 6).
    Trained with its own learning rate, train.lr_gate."""

    def __post_init__(self) -> None:
        if self.scope not in ("global", "input", "output"):
            raise ConfigError(f"scope must be one of global, input, output; got {self.scope!r}")
        if self.width_mode not in ("project", "pad"):
            raise ConfigError(f"width_mode must be 'project' or 'pad'; got {self.width_mode!r}")
        if self.normalize not in typing.get_args(Normalize):
            raise ConfigError(f"normalize must be one of {', '.join(typing.get_args(Normalize))}; "
                              f"got {self.normalize!r}")
        if self.gate not in typing.get_args(Gate):
            raise ConfigError(f"gate must be one of {', '.join(typing.get_args(Gate))}; got {self.gate!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"lam must be a finite number >= 0; got {self.lam!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlyThinkerConfig":
        return from_dict(cls, d, where="flythinker config")
