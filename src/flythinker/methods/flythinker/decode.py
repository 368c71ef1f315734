"""FlyThinker's decode step (paper Section 3.4, Eq. 10, Algorithm 2): the Reasoner and the Generator each keep
their own KV cache and step on the same token at once; G's input is e(y_t) + λ·r_{t-1}.

Owns the per-decode state (`FlyThinkerStepper`), the cost model used to split CPU cores and by the benchmarks
(`per_token_macs`), and the backend choice for a model's placement (`resolve_backend`, `split_threads`). The loop
around it is `flythinker.decoding.loop`; fusion itself is the model's `fuse` / `fused_embeddings` /
`fusion_mask`, so decoding and training share one implementation. `model` below is a FlyThinker (not imported:
the model imports this module to build its decoder).
"""

from __future__ import annotations

from typing import Any

import torch

from ...decoding import concurrency
from ...decoding.concurrency import Call
from ...decoding.loop import PromptState
from ...decoding.sampling import DecodeConfig
from ...flops import attention_macs, linear_macs
from ...hf import accepts, base_model, cache_kwargs, device_of, new_cache


def per_token_macs(model: Any, context: int = 0) -> tuple[int, int]:
    """Multiply-adds per generated token of the Generator (C_G) and the Reasoner (C_R), used to split CPU cores and
    for the benchmarks' `flop_ratio` = (C_G + C_R) / C_G.

    Counts every nn.Linear the step runs: G's decoder layers AND its LM head (even when tied to the input
    embedding, the head is a full matrix-vector product), R's decoder layers only (R's head is never run) plus the
    fusion projection; the input embeddings are lookups and cost nothing. With `context` > 0 it adds attention over
    the KV cache (`flythinker.flops.attention_macs`).
    """
    c_g = linear_macs(model.generator) + attention_macs(model.generator, context)
    c_r = 0
    if model.fusion_enabled:
        c_r = linear_macs(base_model(model.reasoner)) + attention_macs(model.reasoner, context)
        if model.projection is not None:
            c_r += model.projection.weight.numel()
    return c_g, c_r


def resolve_backend(model: Any, concurrent: bool | str = "auto", num_threads: int | None = None) -> str:
    """The backend for this model's placement; without fusion there is no Reasoner step to overlap."""
    if not model.fusion_enabled:
        if concurrent not in (True, False, "auto") and concurrent not in concurrency.BACKENDS:
            raise ValueError(f"concurrent must be True, False, 'auto' or one of {', '.join(concurrency.BACKENDS)}; "
                             f"got {concurrent!r}")
        return "sequential"
    return concurrency.resolve_backend(device_of(model.generator), device_of(model.reasoner), concurrent,
                                       num_threads)


def split_threads(model: Any, total: int, context: int = 0) -> tuple[int, int]:
    """(Generator, Reasoner) intra-op threads out of `total`, proportional to per-token multiply-adds."""
    return concurrency.split_threads(*per_token_macs(model, context), total)


class FlyThinkerStepper:
    """The state of one FlyThinker decode: two KV caches, the growing attention mask, next positions, r_{t-1}."""

    def __init__(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cfg: DecodeConfig):
        self.model, self.cfg = model, cfg
        self.g_dev = self.device = device_of(model.generator)
        self.r_dev = device_of(model.reasoner)
        name = resolve_backend(model, cfg.concurrent)
        context = input_ids.shape[1] + cfg.max_new_tokens // 2
        self.backend = concurrency.make_backend(name, self.g_dev, self.r_dev, cfg.cpu_threads,
                                                macs=lambda: per_token_macs(model, context))
        self.state = PromptState(input_ids, attention_mask, cfg.max_new_tokens, self.g_dev)
        self.mask_r = self.state.mask.to(self.r_dev)
        self.step_pos_r = self.state.step_pos.to(self.r_dev)
        self.keep_logits = {"logits_to_keep": 1} if accepts(model.generator, "logits_to_keep") else {}
        self.g_kw: dict[str, Any] = {}
        self.r_cache: Any = None
        self.r_prev: torch.Tensor | None = None
        self.emb_norm: torch.Tensor | None = None
        self.step_fusion: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """One pass of each model over the whole prompt. Returns G's logits of the first new token (B, V)."""
        model, s = self.model, self.state
        ids, mask = s.ids, s.mask[:, : s.T]
        self.g_kw = cache_kwargs(model.generator, new_cache(model.generator))  # keyword looked up once per decode
        ids_r, pos_r = ids.to(self.r_dev), s.prompt_pos.to(self.r_dev)
        self.r_cache = new_cache(model.reasoner)
        mask_r = self.mask_r[:, : s.T]
        r_call = Call(lambda: model.reason(ids_r, mask_r, position_ids=pos_r, past_key_values=self.r_cache,
                                           use_cache=True), ids_r, pos_r, mask_r)
        states, self.r_cache = self.backend.prefill_side(r_call)                     # (B, T, H_R)
        # Prompt positions are "input" for scope; the fusion mask leaves each row's first real token unfused.
        zeros = torch.zeros_like(ids, dtype=torch.bool)
        embeds, _ = model.fused_embeddings(ids, mask, response_mask=zeros, reasoner_states=states)  # (B, T, H_G)
        out = model.generator(inputs_embeds=embeds, attention_mask=mask, position_ids=s.prompt_pos,
                              **self.g_kw, use_cache=True, **self.keep_logits)
        self.r_prev = states[:, -1:]                     # (B, 1, H_R): r at the last prompt position (left padding)
        # Constant across steps: one vocabulary-wide norm, and the fusion mask of a generated token (a response
        # position whose predecessor is real), both computed once instead of per step.
        self.emb_norm = model.embedding_norm() if model.config.rescale else None
        ones = torch.ones(ids.shape[0], 1, dtype=torch.bool, device=self.g_dev)
        self.step_fusion = model.fusion_mask(ones, response_mask=ones, prev_attention=ones[:, 0])  # (B, 1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, y_t: torch.Tensor) -> torch.Tensor:
        """Algorithm 2, one step: feed token y_t (B,) to both models at once; return G's next logits (B, V).

        (Parallel) R:  r_t     <- R(x_<t, y_t)                  (B, 1) -> (B, 1, H_R), appended to R's cache
        (Parallel) G:  P_{t+1} <- G(e_<t, e(y_t) + λ·r_{t-1})    (B, 1, H_G) -> (B, V), appended to G's cache
        The calls share no data (G reads r_{t-1}, R writes r_t), so the backend may run them concurrently.
        """
        model = self.model
        mask_g, pos_g = self.state.advance()
        cols, t = mask_g.shape[1], self.state.t
        y = y_t[:, None]                                         # (B, 1)
        y_r = y.to(self.r_dev, non_blocking=True)
        mask_r, pos_r = self.mask_r[:, :cols], self.step_pos_r[:, t - 1: t]
        r_prev = self.r_prev

        def g_call() -> torch.Tensor:
            emb = model.generator.get_input_embeddings()(y)                                 # (B, 1, H_G)
            emb = model.fuse(emb, r_prev, self.step_fusion, emb_norm=self.emb_norm)         # e(y_t) + λ·r_{t-1}
            out = model.generator(inputs_embeds=emb, attention_mask=mask_g, position_ids=pos_g,
                                  **self.g_kw, use_cache=True)
            return out.logits[:, -1].float()                                                # (B, V)

        r_call = Call(lambda: model.reason(y_r, mask_r, position_ids=pos_r, past_key_values=self.r_cache,
                                           use_cache=True)[0], y_r, mask_r, pos_r)          # (B, 1, H_R)
        self.r_prev, logits = self.backend.step(r_call, g_call)
        return logits

    def close(self) -> None:
        self.backend.close()


__all__ = ["FlyThinkerStepper", "per_token_macs", "resolve_backend", "split_threads"]
