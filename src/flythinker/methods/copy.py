"""Copy floors: tuning-free, model-free rows that answer with one of the user's own history items verbatim.

`copy_latest` copies the newest profile item, `copy_retrieved` the BM25 top-1 item for the query (the same
`data.retrieval.select_profile` the prompts use). The text copied is the item's body (`data.schema.item_text`: the
field the response corresponds to, e.g. a commit body or a review text), never its title. A model that does not beat
these has learnt nothing about the user beyond "write what they wrote before". An empty profile gives an empty
prediction (scored like any empty prediction). They are `model_free`: experiments write their predictions without
building or loading any model (`experiments.runner.run_method`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.config import DataConfig
from ..data.schema import Example, item_text
from ..utils import UserError
from .base import Method, ModelArgs


class _Copy(Method):
    """A model-free row: `predict_texts` copies the body of the profile item `retrieval` ranks first."""

    trained = False
    model_free = True
    retrieval = ""
    """The `DataConfig.retrieval` whose first item is copied."""

    def data_config(self, data: DataConfig) -> DataConfig:
        import dataclasses

        return dataclasses.replace(data, retrieval=self.retrieval, k=1)

    def predict_texts(self, examples: Sequence[Example], data: DataConfig, store: Any = None) -> list[str]:
        """One prediction per example: the body of its first selected item, "" when the profile is empty.
        `data` is the experiment's prompt settings (for the task); `store`: a ProfileStore (default: inline)."""
        from ..data.prompts import resolve_task
        from ..data.retrieval import select_profile

        cfg = self.data_config(data)
        out = []
        for ex in examples:
            items = select_profile(ex, resolve_task(cfg, ex), cfg.retrieval, cfg.k, cfg.seed, store=store)
            out.append(item_text(items[0]) if items else "")
        return out

    def build(self, args: ModelArgs) -> tuple[nn.Module, Any]:
        raise UserError(f"method {self.name!r} copies a history item and has no model to build")

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        raise UserError(f"method {self.name!r} copies a history item and has no model to load")


class CopyLatest(_Copy):
    name = "copy_latest"
    display = "Copy-latest"
    description = "no model: the user's newest history item, copied verbatim (a floor)"
    retrieval = "recency"


class CopyRetrieved(_Copy):
    name = "copy_retrieved"
    display = "Copy-retrieved"
    description = "no model: the user's history item BM25 ranks first for the query, copied verbatim (a floor)"
    retrieval = "bm25"


__all__ = ["CopyLatest", "CopyRetrieved"]
