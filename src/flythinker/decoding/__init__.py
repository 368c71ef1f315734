"""Decoding for every method: one `DecodeConfig` and sampling, the shared step loop, and two-call concurrency."""

from .loop import CausalLMStepper, GenerationMixin, generate, stream
from .sampling import BACKENDS, DecodeConfig, sample_next_token

__all__ = ["BACKENDS", "CausalLMStepper", "DecodeConfig", "GenerationMixin", "generate", "sample_next_token",
           "stream"]
