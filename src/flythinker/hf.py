"""Thin shims over Hugging Face causal LMs that every method and the decode loop share.

Owns: the decoder stack without the LM head (`base_model`), position ids from a left-padded mask, the
(mask, position_ids) pair to pass to a forward, the KV-cache keyword a model's forward takes and the cache it
returns (the keyword changed in transformers 5.24), whether a forward accepts an argument, embedding sizes, and
reading a parameter whole when DeepSpeed ZeRO-3 has partitioned it (`whole_params`). Nothing here knows about
FlyThinker.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) positions starting at 0 on each row's first real token, so left padding does not
    shift RoPE; rows without left padding get exactly arange(T), as a plain HF forward uses."""
    first = attention_mask.long().argmax(-1, keepdim=True)                              # (B, 1) leading pads
    pos = torch.arange(attention_mask.shape[-1], device=attention_mask.device).unsqueeze(0)
    return (pos - first).clamp(min=0)


def hf_mask_args(attention_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask, position_ids) to hand to an HF model. Without padding both are None: HF then takes its fused causal
    attention path (an explicit all-ones mask makes a CPU training step slower for no change in the result)."""
    if bool(attention_mask.all()):
        return None, None
    return attention_mask, position_ids_from_mask(attention_mask)


def base_model(lm: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (avoids computing (B, T, V) logits when only states are needed)."""
    get = getattr(lm, "get_decoder", None)
    base = get() if callable(get) else None
    if base is None:
        base = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if base is None:
        raise TypeError(f"cannot find the decoder stack of {type(lm).__name__}")
    return base


def unwrapped(lm: nn.Module) -> nn.Module:
    """The model under a peft wrapper (whose forward takes **kwargs and hides the real signature)."""
    return lm.get_base_model() if callable(getattr(lm, "get_base_model", None)) else lm


def cache_kwargs(lm: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for an HF forward call, where name is the KV-cache keyword `lm.forward` takes: `cache` from
    transformers 5.24 on (where `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before.
    Read from the signature of the unwrapped (non-PEFT) class, once per class."""
    return {_cache_keyword(type(unwrapped(lm))): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache an HF forward returned (`cache` from transformers 5.24 on, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def new_cache(lm: nn.Module) -> Any:
    """An empty dynamic KV cache for `lm`."""
    from transformers import DynamicCache

    return DynamicCache(config=lm.config)


def accepts(lm: nn.Module, name: str) -> bool:
    """Whether `lm.forward` takes the keyword `name` (e.g. logits_to_keep, which older models lack)."""
    try:
        return name in inspect.signature(unwrapped(lm).forward).parameters
    except (TypeError, ValueError):
        return False


def device_of(lm: nn.Module) -> torch.device:
    return lm.get_input_embeddings().weight.device


def embedding_rows(lm: nn.Module) -> int:
    return lm.get_input_embeddings().num_embeddings


def hidden_size(lm: nn.Module) -> int:
    return lm.get_input_embeddings().embedding_dim


def context_limit(lm: nn.Module) -> int | None:
    """The model's maximum number of positions, when its config says."""
    return getattr(getattr(lm, "config", None), "max_position_embeddings", None)


def zero3_partitioned(t: torch.Tensor) -> bool:
    """Whether `t` is a parameter DeepSpeed ZeRO-3 has partitioned (outside its module's forward it holds this
    process's slice only, an empty tensor; its full shape is `t.ds_shape`)."""
    return hasattr(t, "ds_id")


@contextlib.contextmanager
def whole_params(*params: torch.Tensor) -> Iterator[None]:
    """Within the block, ZeRO-3-partitioned `params` hold their whole tensors (read-only); others are untouched.

    A module's own forward sees its parameters whole under ZeRO-3, but a read of another module's weight (the
    embedding table's norm in fusion) sees an empty slice. Gathering is a collective: under ZeRO-3 every process
    must enter the block together, as every process runs the same forward in training."""
    parts = [p for p in params if zero3_partitioned(p)]
    if parts:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # One a module holds gathered right now (its forward ran and has not released it) is whole already, and
        # must stay so: gathering it again would partition it at the block's end, under the module.
        parts = [p for p in parts if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=None):
        yield
