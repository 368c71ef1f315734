"""From examples to tensors: `encode_example` (prompt ids + response ids ending in EOS), `collate` (padding,
attention masks, labels -100 on the prompt and on padding, a response mask) and the `PersonalizedDataset` wrapper.

Training batches may pad on either side (positions are recomputed from the mask by the model); generation batches
hold prompts only and are left-padded so every row's next token is in the last column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import Dataset

from ..utils import UserError
from .config import DataConfig
from .prompts import build_prompt, has_chat_template
from .schema import Example
from .truncate import truncate_to_tokens

IGNORE_INDEX = -100


def eos_token_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError("the tokenizer has no EOS token; responses must end with one")
    return int(eos)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or EOS when it has none (masked out either way)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_token_id(tokenizer)


def encode_prompt(prompt: str, tokenizer: Any, cfg: DataConfig) -> list[int]:
    """Prompt ids. A chat template already spells out any BOS, so special tokens are not added again; plain text
    gets the tokenizer's usual prefix (e.g. Llama's BOS) but never a trailing EOS."""
    if cfg.use_chat_template and has_chat_template(tokenizer):
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    eos = getattr(tokenizer, "eos_token_id", None)
    if ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def encode_example(example: Example, tokenizer: Any, cfg: DataConfig, with_response: bool = True,
                   store: Any = None) -> dict:
    """{"prompt_ids": list[int], "response_ids": list[int]}; the response is the target cut to
    cfg.target_tokens (sentence boundaries) plus EOS (none after a cut target when cfg.eos_after_cut is False),
    or [] when with_response is False. `store`: where the user's history comes from (a
    `flythinker.data.store.ProfileStore`; default: the example's own profile)."""
    prompt_ids = encode_prompt(build_prompt(example, tokenizer, cfg, store=store), tokenizer, cfg)
    response_ids: list[int] = []
    if with_response:
        target = truncate_to_tokens(example.output, tokenizer, cfg.target_tokens)
        response_ids = list(tokenizer.encode(target, add_special_tokens=False))
        # a cut target is a strict prefix of the output (truncate_to_tokens returns the output itself when it fits)
        if cfg.eos_after_cut or target == example.output:
            response_ids.append(eos_token_id(tokenizer))
    return {"prompt_ids": prompt_ids, "response_ids": response_ids}


def collate(features: Sequence[dict], pad_token_id: int, padding_side: str | None = None) -> dict[str, torch.Tensor]:
    """Pad encoded features into a batch: the one collator of training, validation and generation.

    Args:
        features: dicts with "prompt_ids" and optionally "response_ids" (as `encode_example` makes), or with
            "input_ids" and "labels" (aligned lists, -100 where unsupervised); other keys are ignored.
        pad_token_id: id placed in padded input positions.
        padding_side: "right" or "left"; None = "left" when no feature has a response (generation), else "right".

    Returns LongTensors of shape (B, T): input_ids, attention_mask (1 on real tokens), labels (-100 on prompt and
    padding), response_mask (1 on supervised tokens).
    """
    if not features:
        raise ValueError("collate needs at least one feature")
    rows = []  # (ids, labels) per feature
    for f in features:
        if "prompt_ids" in f:
            p = list(f["prompt_ids"])
            r = list(f["response_ids"]) if f.get("response_ids") is not None else []
            rows.append((p + r, [IGNORE_INDEX] * len(p) + r))
        else:
            rows.append((list(f["input_ids"]), list(f["labels"])))
    if padding_side is None:
        padding_side = "right" if any(any(y != IGNORE_INDEX for y in lab) for _, lab in rows) else "left"
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    B, T = len(rows), max(len(ids) for ids, _ in rows)
    input_ids = torch.full((B, T), int(pad_token_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        n = len(x)
        start = T - n if padding_side == "left" else 0
        input_ids[i, start:start + n] = torch.tensor(x, dtype=torch.long)
        attention_mask[i, start:start + n] = 1
        labels[i, start:start + n] = torch.tensor(y, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "response_mask": (labels != IGNORE_INDEX).long()}


class PersonalizedDataset(Dataset):
    """A torch Dataset of encoded examples: item i is encode_example(examples[i]) plus "index" and "id".

    lazy=True encodes on first access and caches (fast start on big files); lazy=False encodes everything now
    (fails early on bad data, and a DataLoader's workers then share finished features).
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Any, cfg: DataConfig | None = None,
                 with_response: bool = True, lazy: bool = True):
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.cfg = cfg or DataConfig()
        self.with_response = with_response
        self._cache: dict[int, dict] = {}
        if not lazy:
            for i in range(len(self.examples)):
                self[i]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self.examples)
        if i not in self._cache:
            feat = encode_example(self.examples[i], self.tokenizer, self.cfg, self.with_response)
            self._cache[i] = {**feat, "index": i, "id": self.examples[i].id}
        return self._cache[i]

    def collate_fn(self, padding_side: str | None = None) -> Callable[[Sequence[dict]], dict[str, torch.Tensor]]:
        """A DataLoader collate_fn padding with this tokenizer's pad id."""
        return partial(collate, pad_token_id=pad_token_id(self.tokenizer), padding_side=padding_side)


__all__ = ["IGNORE_INDEX", "PersonalizedDataset", "collate", "encode_example", "encode_prompt", "eos_token_id",
           "pad_token_id"]
