"""The decode loop shared by every method: prefill, then one step per new token, per-row EOS, streaming.

A method plugs in through two things its model provides (the `Decodable` protocol):
  * `decode_lms()`: the HF models a decode runs, the Generator first (its generation config gives the EOS / pad
    ids; every model's context length bounds prompt + new tokens);
  * `decoder(input_ids, attention_mask, cfg)`: a `Stepper` holding that decode's state (KV caches, masks,
    positions): `prefill()` -> logits of the first new token, `step(tokens)` -> logits of the next one, `close()`.
`CausalLMStepper` is the stepper of one HF causal LM (SFT, RAG, Non-personalized); FlyThinker's two-model step is
`flythinker.methods.flythinker.decode`. `GenerationMixin` gives a model `generate` and `stream` on top of these.
Sampling and the step's logits processing (repetition penalty, no-repeat n-grams, min new tokens: transformers'
processors) are `flythinker.decoding.sampling`; overlapping two calls per step is `flythinker.decoding.concurrency`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from ..hf import accepts, cache_kwargs, context_limit, device_of, new_cache, position_ids_from_mask
from .sampling import (
    NO_TOKEN,
    DecodeConfig,
    apply_processors,
    build_logits_processor,
    decode_config,
    pick_token,
    sample_next_token,
)


class Stepper(Protocol):
    """One decode's state. `device`: where the logits live (sampling runs there)."""

    device: torch.device

    def prefill(self) -> torch.Tensor:
        """Run the prompt; return the logits (B, V) of the first new token."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the picked tokens (B,); return the logits (B, V) of the next position."""

    def close(self) -> None:
        """Release per-decode resources (threads, streams)."""


class Decodable(Protocol):
    def decode_lms(self) -> list[tuple[str, nn.Module]]: ...

    def decoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig) -> Stepper: ...


class PromptState:
    """The per-decode bookkeeping every stepper needs: the growing attention mask (one buffer sliced per step,
    since it only ever grows by columns of ones), prompt positions from the left padding, and the position of each
    generated token (each row's last prompt position + t)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 device: torch.device):
        self.ids = input_ids.to(device)
        mask = attention_mask.to(device)
        B, T = self.ids.shape
        self.mask = torch.ones(B, T + max_new_tokens, dtype=mask.dtype, device=device)
        self.mask[:, :T] = mask
        self.prompt_pos = position_ids_from_mask(mask)                                 # (B, T)
        self.step_pos = self.prompt_pos[:, -1:] + torch.arange(1, max_new_tokens + 1, device=device)  # (B, n)
        self.T, self.t = T, 0

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Count one fed token; return (attention mask over all cached positions (B, T + t), its position (B, 1))."""
        self.t += 1
        return self.mask[:, : self.T + self.t], self.step_pos[:, self.t - 1: self.t]


class CausalLMStepper:
    """Decoding one HF causal LM with its KV cache (what SFT, RAG and Non-personalized run)."""

    def __init__(self, lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig):
        self.lm = lm
        self.device = device_of(lm)
        self.state = PromptState(input_ids, attention_mask, cfg.max_new_tokens, self.device)
        self.keep_logits = {"logits_to_keep": 1} if accepts(lm, "logits_to_keep") else {}
        self.cache_kw: dict[str, Any] = {}

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        s = self.state
        self.cache_kw = cache_kwargs(self.lm, new_cache(self.lm))  # the cache keyword looked up once per decode
        out = self.lm(input_ids=s.ids, attention_mask=s.mask[:, : s.T], position_ids=s.prompt_pos,
                      **self.cache_kw, use_cache=True, **self.keep_logits)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        mask, pos = self.state.advance()
        out = self.lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos, **self.cache_kw,
                      use_cache=True)
        return out.logits[:, -1].float()

    def close(self) -> None:
        pass


def check_inputs(lms: list[tuple[str, nn.Module]], input_ids: Any, attention_mask: Any,
                 cfg: DecodeConfig) -> torch.Tensor:
    """Validate a left-padded prompt batch; return its attention mask (ones when None). One-line ValueErrors."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) LongTensor; got {shape}")
    if input_ids.numel() == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         f"must have the same shape")
    m = attention_mask.long()
    lengths = m.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"empty prompt: row {int((lengths == 0).nonzero()[0])} of attention_mask has no tokens")
    # Left padding means each row is zeros then ones; decoding appends after the last column, so right padding
    # (or holes) would put new tokens after pads with wrong positions.
    if (m[:, 1:] < m[:, :-1]).any() or not bool((m[:, -1] == 1).all()):
        raise ValueError("prompts must be left-padded (zeros then ones in each attention_mask row); set "
                         "tokenizer.padding_side = 'left'")
    longest = int(lengths.max())
    for name, lm in lms:
        limit = context_limit(lm)
        if limit is not None and longest + cfg.max_new_tokens > limit:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the "
                             f"{name}'s context of {limit} positions")
    return attention_mask


def _config_ids(lm: nn.Module, name: str) -> Any:
    for src in (getattr(lm, "generation_config", None), getattr(lm, "config", None)):
        v = getattr(src, name, None)
        if v is not None:
            return v
    return None


def special_ids(generator: nn.Module, cfg: DecodeConfig) -> tuple[list[int], int]:
    """(EOS ids, pad id): the config's when set, else the Generator's generation_config / config."""
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else _config_ids(generator, "eos_token_id")
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else _config_ids(generator, "pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


def stream(model: Decodable, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           streamer: Any = None, generation_config: Any = None, **kwargs: Any) -> Iterator[torch.Tensor]:
    """Decode step by step, yielding each new token column (B,) as soon as it is picked.

    input_ids / attention_mask: (B, T) left-padded prompt. kwargs: `DecodeConfig` fields, overriding
    `generation_config` (a transformers.GenerationConfig, see `DecodeConfig.from_generation_config`). Rows that
    have emitted EOS yield pad_token_id; iteration stops when every row is done or after max_new_tokens columns.
    streamer: optional object with put/end (transformers' TextStreamer works): it gets the prompt first, then every
    column (as transformers' generate does), then end().
    Bad input raises here, before the first next(); decoding starts on the first next().
    """
    cfg = decode_config({**kwargs, "generation_config": generation_config})
    attention_mask = check_inputs(model.decode_lms(), input_ids, attention_mask, cfg)
    return _stream(model, input_ids, attention_mask, cfg, streamer)


def _stream(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig,
            streamer: Any) -> Iterator[torch.Tensor]:
    eos_ids, pad = special_ids(model.decode_lms()[0][1], cfg)
    was_training = model.training
    model.eval()  # dropout off; restored on exit
    stepper = model.decoder(input_ids, attention_mask, cfg)
    dev = stepper.device
    rng = torch.Generator(device=dev).manual_seed(cfg.seed) if cfg.seed is not None else None
    eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=dev)
    seq = procs = None
    if cfg.uses_history:  # the one check default settings pay: no sequence kept, no processors built
        B, T = input_ids.shape
        prompt = input_ids.to(dev).masked_fill(attention_mask.to(dev) == 0, NO_TOKEN)        # (B, T)
        procs = build_logits_processor(cfg, eos_ids, T, dev, prompt_ids=prompt)
        with torch.inference_mode():
            # The running sequence the processors read: prompt (padding as NO_TOKEN, so it counts for nothing)
            # then each picked column; seq[:, : T + t] is what step t sees.
            seq = torch.full((B, T + cfg.max_new_tokens), NO_TOKEN, dtype=torch.long, device=dev)  # (B, T + N)
            if cfg.penalty_scope == "all":  # "response": the prompt stays NO_TOKEN, so only new tokens count
                seq[:, :T] = prompt
    try:
        if streamer is not None:
            streamer.put(input_ids.detach().cpu())
        logits = stepper.prefill()                                                    # (B, V)
        for t in range(cfg.max_new_tokens):
            with torch.inference_mode():
                if procs is None:
                    raw = sample_next_token(logits, rng, cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p)
                else:
                    scores = apply_processors(procs, seq[:, : T + t], logits.float())       # (B, V)
                    raw = pick_token(scores, rng, cfg.sampled)                              # (B,)
                col = torch.where(done, torch.full_like(raw, pad), raw)               # (B,)
                if seq is not None:
                    seq[:, T + t] = col  # finished rows append pad, as transformers' generate does
                done = done | torch.isin(raw, eos)
                finished = bool(done.all()) or t == cfg.max_new_tokens - 1            # the one host sync a step
            col = col.clone()  # a normal tensor for the caller (inference tensors refuse in-place updates)
            if streamer is not None:
                streamer.put(col.cpu())
            yield col
            if finished:
                break
            # Finished rows keep feeding their (valid) sampled id: their outputs are discarded anyway.
            logits = stepper.step(raw)
    finally:
        stepper.close()
        model.train(was_training)
        if streamer is not None:
            streamer.end()


def generate(model: Decodable, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             streamer: Any = None, generation_config: Any = None, **kwargs: Any) -> torch.Tensor:
    """KV-cached decoding of a left-padded batch. input_ids / attention_mask: (B, T). kwargs: `DecodeConfig`
    fields, overriding `generation_config` (a transformers.GenerationConfig). Returns a LongTensor (B, N) of the
    new tokens only, N <= max_new_tokens, each row padded with pad_token_id after its EOS."""
    cfg = decode_config({**kwargs, "generation_config": generation_config})
    attention_mask = check_inputs(model.decode_lms(), input_ids, attention_mask, cfg)
    cols = list(_stream(model, input_ids, attention_mask, cfg, streamer))
    return torch.stack(cols, dim=1)


class GenerationMixin:
    """`generate` / `stream` for a model that implements `decode_lms` and `decoder` (as HF's PreTrainedModel gets
    generate from its GenerationMixin)."""

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config: Any = None, **kwargs: Any):
        """Returns a LongTensor (B, N) of new tokens only, rows padded with pad_token_id after their EOS.
        kwargs: `flythinker.decoding.DecodeConfig` fields, overriding `generation_config` (a
        transformers.GenerationConfig)."""
        return generate(self, input_ids, attention_mask, generation_config=generation_config, **kwargs)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               generation_config: Any = None, **kwargs: Any):
        """Yields each new token column (B,) as it is picked; see `flythinker.decoding.loop.stream`."""
        return stream(self, input_ids, attention_mask, generation_config=generation_config, **kwargs)


__all__ = ["CausalLMStepper", "Decodable", "GenerationMixin", "PromptState", "Stepper", "check_inputs", "generate",
           "special_ids", "stream"]
