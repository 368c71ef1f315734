"""Decoding for every method: one `DecodeConfig`, sampling and the step's logits processing (transformers'
processors), the shared step loop, and two-call concurrency."""

from .loop import CausalLMStepper, GenerationMixin, generate, stream
from .sampling import BACKENDS, DecodeConfig, build_logits_processor, sample_next_token

__all__ = ["BACKENDS", "CausalLMStepper", "DecodeConfig", "GenerationMixin", "build_logits_processor", "generate",
           "sample_next_token", "stream"]
