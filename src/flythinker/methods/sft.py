"""The Generator alone: SFT (trained on the same data and budget as FlyThinker), and two untrained presets of the
same model: RAG (retrieved history in the prompt) and Non-personalized (the query only).

SFT is FlyThinker without a Reasoner (`FlyThinker(generator, None)` is exactly the plain Generator), so it is
trained by the same trainer, decoded by the same loop (`CausalLMStepper`) and saved in the same format.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.config import DataConfig
from .base import Method, ModelArgs, setup_lms
from .flythinker.model import FlyThinker


class SFT(Method):
    name = "sft"
    display = "SFT"
    trained = True
    description = "the Generator fine-tuned on the users' data (retrieved history in the prompt)"

    def model_args(self, args: ModelArgs) -> ModelArgs:
        return dataclasses.replace(args, method="sft")

    def from_lms(self, generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs,
                 tokenizer: Any = None) -> nn.Module:
        """The Generator alone; a given Reasoner is ignored (SFT is FlyThinker without one)."""
        generator, _ = setup_lms(generator, None, args)
        return FlyThinker(generator, None, args.fusion, tokenizer=tokenizer)

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        return FlyThinker.from_pretrained(path, dtype=dtype)


class RAG(SFT):
    name = "rag"
    display = "RAG"
    trained = False
    description = "the untrained Generator with the retrieved history in the prompt"


class NonPersonalized(SFT):
    name = "nonpersonalized"
    display = "Non-personalized"
    trained = False
    description = "the untrained Generator with the query only"

    def data_config(self, data: DataConfig) -> DataConfig:
        return dataclasses.replace(data, retrieval="none", k=0)


__all__ = ["RAG", "SFT", "NonPersonalized"]
