"""FlyThinker's entry in the method registry: how to build, set up and load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import Method, ModelArgs, setup_lms
from .model import FlyThinker


class FlyThinkerMethod(Method):
    name = "flythinker"
    display = "FlyThinker"
    trained = True
    description = "Generator + Reasoner, latent states fused at every position, trained jointly (the paper's)"

    def model_args(self, args: ModelArgs) -> ModelArgs:
        import dataclasses

        return dataclasses.replace(args, method="flythinker")

    uses_reasoner = True

    def from_lms(self, generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs,
                 tokenizer: Any = None) -> nn.Module:
        generator, reasoner = setup_lms(generator, reasoner, args)
        return FlyThinker(generator, reasoner, args.fusion, tokenizer=tokenizer)

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        return FlyThinker.from_pretrained(path, dtype=dtype)


__all__ = ["FlyThinkerMethod"]
