"""The one FLOP counter: multiply-adds per token of a model's step, for CPU core splits, benchmarks' FLOP ratios
and the cost figures of every method (counted from the modules, not from a formula per architecture)."""

from __future__ import annotations

from torch import nn


def linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear in `module` (an LM head tied to the input embedding is still a
    full matrix-vector product, and counts; embedding lookups cost nothing)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def attention_macs(lm: nn.Module, context: int) -> int:
    """Attention over a KV cache of `context` positions: 2 · context · heads · head_dim per layer (the scores and
    the weighted sum of values); 0 when context is 0 or the config does not say."""
    cfg = getattr(lm, "config", None)
    layers, heads = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "num_attention_heads", 0)
    if not (context and layers and heads):
        return 0
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * context * heads * head_dim * layers
