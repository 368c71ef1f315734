"""The interleaved foil (the paper's Fig. 1, third row): the Generator itself thinks one latent thought before every
k-th response token, sequentially, in the same model, in training and decoding. It exists to show, measured, why
FlyThinker's separate Reasoner running in parallel matters: here every thought is an extra sequential Generator
step, and training cannot be one teacher-forced pass.

    stream:   x_1 .. x_P  ẽ_1 y_1 .. y_k  ẽ_2 y_{k+1} .. y_{2k}  ẽ_3 ...      (a thought before y_1, y_{k+1}, ...)
    thought:  ẽ_b = h(the position before it)      (`LatentLM.feed_back`, shared with Coconut; rescaled by default)
    loss:     -Σ_j log p(y_j | x, the stream before y_j); y_j after a thought is predicted at the thought

Owns: `InterleavedConfig` (the `interleaved:` settings), the block-by-block teacher-forced forward over one KV cache
with gradients through every thought (`InterleavedModel.forward`, ceil(R/k) + 1 passes), the cached decode
(`InterleavedStepper`: one pass per token, two when a thought follows it), the registry entry (`Interleaved`).
The Generator's pass and head, the thought itself, persistence and the cost extras are `coconut.LatentLM`'s.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.collate import IGNORE_INDEX
from ..decoding.loop import PromptState
from ..decoding.sampling import DecodeConfig
from ..hf import device_of, new_cache, position_ids_from_mask
from .base import Method, ModelArgs, next_token_nll, setup_lms
from .coconut import LatentLM, LatentOutput, check_cache_training, split_prompt_response
from .configs import InterleavedConfig


class InterleavedModel(LatentLM):
    """The Generator thinking one thought (its own last hidden state fed back) before every k-th response token."""

    method_name = "interleaved"
    config_class = InterleavedConfig

    def __init__(self, generator: nn.Module, config: InterleavedConfig | None = None, tokenizer: Any = None):
        super().__init__(generator, config or InterleavedConfig(), tokenizer)

    def latent_steps(self, generated: int) -> int:
        return math.ceil(generated / self.config.every) if generated > 0 else 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, response_mask: torch.Tensor | None = None) -> LatentOutput:
        """Teacher-forced training over one KV cache: the prompt, then per block b the pass [ẽ_b, y_{bk+1..bk+k}],
        ẽ_b fed back from the previous pass's last state (so gradients run through every thought).

        input_ids / attention_mask / labels: (B, T), any padding side; response_mask: (B, T) (default
        labels != -100). Every row needs a prompt token (the first thought is fed back from it). Returns
        `LatentOutput` with logits (B, S, V) over the stream after the prompt, S = R + ceil(R / k).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if response_mask is None:
            if labels is None:
                raise ValueError("the interleaved forward needs labels or response_mask to know where the response "
                                 "(and its thoughts) start")
            response_mask = labels != IGNORE_INDEX
        pr = split_prompt_response(input_ids, attention_mask, response_mask, labels)
        if pr.prompt_mask.shape[1] == 0 or not bool(pr.prompt_mask[:, -1].all()):
            raise ValueError("every row needs at least one prompt token (the first thought is its last state)")
        B, P = pr.prompt_ids.shape
        R, k = pr.response_ids.shape[1], self.config.every
        blocks = [(s, min(s + k, R)) for s in range(0, R, k)]
        # The stream's mask: a block's thought is real when its row still has a response token in that block.
        stream = []
        for s, e in blocks:
            stream += [pr.response_mask[:, s: s + 1], pr.response_mask[:, s:e]]
        mask = torch.cat([pr.prompt_mask, *stream], 1)                                   # (B, P + S)
        positions = position_ids_from_mask(mask)     # real columns are contiguous per row, so these are exact
        attn = None if bool(mask.all()) else mask
        emb_norm = self.embedding_norm() if self.config.rescale else None
        cache = new_cache(self.generator)
        states = self.run(self.embed(pr.prompt_ids), None if attn is None else attn[:, :P], positions[:, :P], cache)
        h = states[:, -1]                                                                # (B, H)
        col, thoughts, logits = P, [], []
        loss_sum = h.sum() * 0.0                # a graph even without response tokens, so backward always runs
        n_tokens = torch.zeros((), dtype=torch.long, device=h.device)
        for s, e in blocks:
            thought = self.feed_back(h, emb_norm)                                        # (B, H) ẽ_b
            thoughts.append(thought)
            x = torch.cat([thought[:, None], self.embed(pr.response_ids[:, s:e])], 1)    # (B, 1 + e - s, H)
            L = x.shape[1]
            states = self.run(x, None if attn is None else attn[:, : col + L], positions[:, col: col + L], cache)
            block_logits = self.logits(states)                                           # (B, L, V)
            # aligned with the inputs [ẽ_b, y_s..y_e]: the thought predicts y_s; the block's last token predicts
            # nothing (a thought follows it)
            targets = torch.cat([pr.targets.new_full((B, 1), IGNORE_INDEX), pr.targets[:, s:e]], 1)
            ls, nt = next_token_nll(block_logits, targets)
            loss_sum, n_tokens = loss_sum + ls, n_tokens + nt
            logits.append(block_logits)
            h = states[:, -1]   # a row whose response ended here has no later real column, so its h is unused
            col += L
        V = self.generator.get_output_embeddings().weight.shape[0]
        all_logits = torch.cat(logits, 1) if logits else h.new_zeros(B, 0, V)
        all_thoughts = torch.stack(thoughts, 1) if thoughts else h.new_zeros(B, 0, h.shape[-1])
        return LatentOutput(loss=loss_sum / n_tokens.clamp_min(1), logits=all_logits, loss_sum=loss_sum,
                            n_tokens=n_tokens, thoughts=all_thoughts)

    def decoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cfg: DecodeConfig) -> InterleavedStepper:
        self._check_context(input_ids, attention_mask, self.latent_steps(cfg.max_new_tokens), cfg)
        return InterleavedStepper(self, input_ids, attention_mask, cfg)


class InterleavedStepper:
    """One interleaved decode (left-padded batch, one KV cache): prefill = prompt, then the first thought; each step
    feeds the token and, when the next token starts a block, a thought after it (two sequential passes)."""

    def __init__(self, model: InterleavedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cfg: DecodeConfig):
        self.model = model
        self.device = device_of(model.generator)
        thoughts = model.latent_steps(cfg.max_new_tokens)       # thoughts take positions too
        self.state = PromptState(input_ids, attention_mask, cfg.max_new_tokens + thoughts, self.device)
        self.cache: Any = None
        self.emb_norm: torch.Tensor | None = None
        self.fed = 0                                            # response tokens fed so far

    def _thought(self, h: torch.Tensor) -> torch.Tensor:
        """Feed back h (B, H) as the next position; return that position's logits (B, V)."""
        mask, pos = self.state.advance()
        states = self.model.run(self.model.feed_back(h, self.emb_norm)[:, None], mask, pos, self.cache)
        return self.model.logits(states)[:, -1].float()

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        m, s = self.model, self.state
        self.cache = new_cache(m.generator)
        self.emb_norm = m.embedding_norm() if m.config.rescale else None
        states = m.run(m.embed(s.ids), s.mask[:, : s.T], s.prompt_pos, self.cache)       # (B, T, H)
        return self._thought(states[:, -1])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        mask, pos = self.state.advance()
        states = m.run(m.embed(tokens[:, None]), mask, pos, self.cache)                  # (B, 1, H)
        self.fed += 1
        if self.fed % m.config.every == 0:    # the next token starts a block: think first
            return self._thought(states[:, -1])
        return m.logits(states)[:, -1].float()

    def close(self) -> None:
        pass


class Interleaved(Method):
    name = "interleaved"
    display = "Interleaved"
    trained = True
    uses_reasoner = False
    description = "the foil: the Generator itself thinks one latent thought before every k-th response token"

    def model_args(self, args: ModelArgs) -> ModelArgs:
        return dataclasses.replace(args, method=self.name)

    @staticmethod
    def settings(args: ModelArgs) -> InterleavedConfig:
        """`args.interleaved` when ModelArgs has that section, else the defaults."""
        return getattr(args, "interleaved", None) or InterleavedConfig()

    def from_lms(self, generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs,
                 tokenizer: Any = None) -> nn.Module:
        """The Generator alone; a given Reasoner is ignored."""
        check_cache_training(args, self.name)
        generator, _ = setup_lms(generator, None, args)
        return InterleavedModel(generator, self.settings(args), tokenizer=tokenizer)

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        return InterleavedModel.from_pretrained(path, dtype=dtype)


__all__ = ["Interleaved", "InterleavedConfig", "InterleavedModel", "InterleavedStepper"]
