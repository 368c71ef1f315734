"""Coconut (Hao et al., 2024, "Training Large Language Models to Reason in a Continuous Latent Space") as a
think-then-generate baseline: the Generator alone thinks c continuous thoughts between the prompt and the response,
each thought being its own last hidden state fed back as the next input embedding, then writes the response.

    sequence:  x_1 .. x_P  <bot>  ẽ_1 .. ẽ_c  <eot>  y_1 .. y_N
    thought:   ẽ_k = h(previous position)            (`LatentLM.feed_back`; optionally rescaled, `rescale`)
    loss:      -Σ_j log p(y_j | x, <bot>, ẽ_1..c, <eot>, y_<j)   on response tokens only

Owns: `CoconutConfig` (the `coconut:` settings), the latent chain (`CoconutModel.think`, shared by training and
decoding), the batched teacher-forced forward that reuses one KV cache with gradients through the chain
(`CoconutModel.forward`), the KV-cached decode (`CoconutStepper`), save/load, and the registry entry (`Coconut`).
Also the pieces the interleaved foil (`methods/interleaved.py`) reuses, so both feed thoughts back through one
implementation: `LatentLM` (the Generator's decoder pass and head, `feed_back`, training / decode hooks, per-row
cost extras, persistence) and `split_prompt_response` (a padded training batch -> left-padded prompts +
right-padded responses, so every row's thoughts start at the same column).

Why <bot>/<eot> are two learned vectors (`CoconutModel.markers`, trained, saved with the model) and not new
vocabulary entries: nothing in the tokenizer, the embedding table or the LM head changes, so any HF causal LM works
unmodified and a checkpoint's generator/ is a plain HF model. Training runs c + 1 passes over one KV cache, as the
official code does; its decoding takes one prompt at a time and re-runs the whole sequence for every new token,
while here decoding is batched (left padding, per-row positions) and KV-cached.

Coconut's curriculum (`coconut.curriculum`, off by default; off, training is the last stage only, all c thoughts
at once) takes its chain of thought s_1..s_n from a teacher (`methods.teachers`, as CoT does), one step a sentence:

    stage k = 0..K:  x_1 .. x_P  <bot>  ẽ_1 .. ẽ_{k·c}  <eot>  s_{k+1} .. s_n  y_1 .. y_N   (stage K: no s at all)
    loss:            on the remaining steps and the response

`Coconut.features` writes every stage of each example (`curriculum_feature`, thoughts as `LATENT_SLOT` ids), the
trainer takes them stage by stage (their "stage" field), and the forward gives each row as many thoughts as it has
slots (`take_latent_slots`; a row with fewer than the batch's most has its first thought columns masked). A
curriculum-trained model decodes with its last stage's K·c thoughts (`CoconutModel.n_thoughts`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.collate import IGNORE_INDEX
from ..data.config import DataConfig
from ..data.schema import Example
from ..decoding.loop import GenerationMixin, PromptState, special_ids
from ..decoding.sampling import DecodeConfig, decode_config
from ..hf import base_model, cache_kwargs, context_limit, device_of, new_cache, position_ids_from_mask
from ..utils import UserError
from .base import Method, ModelArgs, next_token_nll, setup_lms
from .configs import CoconutConfig
from .flythinker.config import FlyThinkerConfig

CONFIG_NAME = "flythinker.json"
"""The checkpoint record every checkpoint check reads (`training.checkpoint`, `inference`, the runner's reuse)."""
EXTRA_WEIGHTS = "latent_markers.safetensors"
"""The marker embeddings, kept under generator/: they are the Generator's extra input rows, and everything that
checks or fingerprints a checkpoint's generator/ (resume, generate, the predictions' checkpoint digest) covers them."""
LATENT_SLOT = -1
"""The input id of a latent slot in a curriculum feature (no tokenizer has a negative id): the column where the
forward puts a continuous thought. Slots sit between a row's prompt and its supervised tokens."""


@dataclass
class LatentOutput:
    """Result of a teacher-forced forward of a latent-thought model (the fields the trainer reads are those of
    `FlyThinkerOutput`).

    loss: mean NLL over response tokens (scalar) or None without labels; loss_sum / n_tokens: its sum and count.
    logits: (B, S, V) logits of the positions after the prompt (Coconut: from <eot> on, S = 1 + R; interleaved:
        the whole thought/token stream), R = the batch's longest response.
    thoughts: (B, n, H) the fed-back input embeddings ẽ, in order.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    loss_sum: torch.Tensor | None = None
    n_tokens: torch.Tensor | None = None
    thoughts: torch.Tensor | None = None


@dataclass
class PromptResponse:
    """A batch split at the prompt/response boundary: prompts left-padded (every prompt ends in the same column, so
    what follows it is column-aligned across rows), responses right-padded. All (B, P) or (B, R) LongTensors;
    `targets` holds -100 on padding."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    targets: torch.Tensor


def split_prompt_response(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                          labels: torch.Tensor | None = None) -> PromptResponse:
    """Re-pad a training batch (left or right padded, as `data.collate` makes it) so prompts end together.

    input_ids, attention_mask, response_mask: (B, T); each row must be [padding] prompt response [padding].
    labels: (B, T) targets (HF convention, aligned with inputs); None: the response's own ids.
    """
    m = attention_mask.bool()
    r = response_mask.bool() & m
    T = input_ids.shape[1]
    dev = input_ids.device
    n_real, n_resp = m.sum(-1), r.sum(-1)                                                  # (B,)
    n_prompt = n_real - n_resp
    first = m.long().argmax(-1)                                                            # (B,) first real column
    cols = torch.arange(T, device=dev)[None]                                               # (1, T)
    span = (cols >= first[:, None]) & (cols < (first + n_real)[:, None])
    resp_span = span & (cols >= (first + n_prompt)[:, None])
    if not (torch.equal(span, m) and torch.equal(resp_span, r)):
        raise ValueError("each row must be [padding] prompt response [padding]: real tokens contiguous and the "
                         "response (labels != -100) at their end")
    P, R = int(n_prompt.max()), int(n_resp.max())
    j = torch.arange(P, device=dev)[None]                                                  # (1, P)
    p_valid = j >= (P - n_prompt)[:, None]                                                 # (B, P) left-padded
    p_src = (first + n_prompt)[:, None] - P + j
    k = torch.arange(R, device=dev)[None]                                                  # (1, R)
    r_valid = k < n_resp[:, None]                                                          # (B, R) right-padded
    r_src = (first + n_prompt)[:, None] + k

    def take(x: torch.Tensor, src: torch.Tensor, valid: torch.Tensor, fill: int) -> torch.Tensor:
        return x.gather(1, src.clamp(0, max(T - 1, 0))).masked_fill(~valid, fill)

    response_ids = take(input_ids, r_src, r_valid, 0)
    targets = take(labels if labels is not None else input_ids, r_src, r_valid, IGNORE_INDEX)
    return PromptResponse(take(input_ids, p_src, p_valid, 0), p_valid.long(), response_ids, r_valid.long(),
                          targets)


def take_latent_slots(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strip the latent slots (`LATENT_SLOT`) off the end of left-padded prompts (as `split_prompt_response` makes
    them) and re-pad the rest so every prompt again ends in the last column.

    prompt_ids, prompt_mask: (B, P); each row's slots must be its last real columns.
    Returns (prompt_ids (B, P'), prompt_mask (B, P'), slots per row (B,)), P' = the longest prompt left.
    """
    B, P = prompt_ids.shape
    slots = (prompt_ids == LATENT_SLOT) & prompt_mask.bool()                                 # (B, P)
    n = slots.sum(-1)                                                                        # (B,)
    cols = torch.arange(P, device=prompt_ids.device)[None]                                   # (1, P)
    if not torch.equal(slots, cols >= (P - n)[:, None]) or bool((prompt_ids < 0).logical_and(~slots).any()):
        raise ValueError("coconut curriculum: each row's latent slots must sit between its prompt and its "
                         "supervised tokens, and no other id may be negative")
    src = (cols - n[:, None]).clamp(min=0)                                                   # shift right by n
    valid = (cols >= n[:, None]) & prompt_mask.gather(1, src).bool()
    ids = prompt_ids.gather(1, src).masked_fill(~valid, 0)
    width = int(valid.sum(-1).max()) if B else 0
    return ids[:, P - width:], valid[:, P - width:].long(), n


def reasoning_steps(text: str) -> list[str]:
    """The curriculum's reasoning steps: the teacher's text cut into sentences (`data.truncate`'s boundaries), each
    stripped and ended with a newline, as Coconut ends each step; empty pieces dropped."""
    from ..data.truncate import sentence_ends

    text = text.strip()
    bounds = [0, *sentence_ends(text), len(text)]
    pieces = (text[a:b].strip() for a, b in itertools.pairwise(bounds))
    return [p + "\n" for p in pieces if p]


def curriculum_feature(prompt_ids: Sequence[int], steps: Sequence[Sequence[int]], response_ids: Sequence[int],
                       stage: int, latents: int, last: bool) -> dict[str, Any]:
    """One example at curriculum stage k (Hao et al. 2024, Sec. 3): prompt, k·c latent slots, the reasoning steps
    after the k-th (none at the last stage), the response. The forward puts <bot> before the slots and <eot>
    after them, so what follows <eot> is the language the model writes, as a decode reads it.

    steps: each reasoning step's token ids; a stage beyond the steps there are has no language reasoning left but
    still k·c thoughts (the decode always runs the last stage's count). Returns {"input_ids", "labels", "stage"}:
    labels -100 on the prompt and the slots, the ids on the remaining reasoning and the response."""
    slots = [LATENT_SLOT] * (stage * latents)
    tail = ([] if last else [t for s in steps[stage:] for t in s]) + list(response_ids)
    head = list(prompt_ids) + slots
    return {"input_ids": head + tail, "labels": [IGNORE_INDEX] * len(head) + tail, "stage": int(stage)}


def generated_counts(new_tokens: torch.Tensor, eos_ids: list[int]) -> list[int]:
    """Tokens each row of a `generate` result (B, N) actually decoded: up to and including its first EOS."""
    if not eos_ids or new_tokens.shape[1] == 0:
        return [int(new_tokens.shape[1])] * new_tokens.shape[0]
    hit = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))          # (B, N)
    first = torch.where(hit.any(-1), hit.long().argmax(-1) + 1, torch.full_like(hit[:, 0], new_tokens.shape[1],
                                                                                 dtype=torch.long))
    return [int(n) for n in first]


class _GeneratorPart(nn.Module):
    """The Generator plus a method's extra input vectors as ONE optimizer part, "generator" (lr_generator): the
    extra vectors are input embeddings of the Generator, trained like its embedding table (as Coconut's added
    vocabulary rows are). Built on the fly by `trainable_parts`; it owns nothing."""

    def __init__(self, generator: nn.Module, extra: nn.Parameter):
        super().__init__()
        self.generator = generator
        self.extra = extra
        if hasattr(generator, "merge_and_unload"):
            # The trainer keeps LoRA adapters for an exact resume when a part is a peft model: stay one.
            self.merge_and_unload = generator.merge_and_unload


class LatentLM(GenerationMixin, nn.Module):
    """A Generator that feeds its own last hidden states back as input embeddings (Coconut, the interleaved foil).

    Subclasses set `method_name` and `config_class`, and implement `forward`, `decoder` and `latent_steps`."""

    method_name = ""
    config_class: type = CoconutConfig

    def __init__(self, generator: nn.Module, config: Any, tokenizer: Any = None):
        super().__init__()
        self.generator = generator
        self.config = config
        self.tokenizer = tokenizer
        self.last_generation_extras: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------------------------------------------------
    # the Generator's pieces, one function each

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings e(x): (B, L) -> (B, L, H)."""
        return self.generator.get_input_embeddings()(ids)

    def embedding_norm(self) -> torch.Tensor:
        """Mean L2 norm of the Generator's input-embedding rows (scalar, detached: a target scale, not a path for
        gradients), one vocabulary-wide constant, so training and decoding rescale a thought identically."""
        return self.generator.get_input_embeddings().weight.detach().float().norm(dim=-1).mean()

    def feed_back(self, h: torch.Tensor, emb_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Coconut's continuous thought: the next input embedding IS the last hidden state of the previous
        position, ẽ = h, or with `rescale` ẽ = h · ē / ‖h‖ (ē the mean embedding-row norm). Used by training and
        decoding alike.

        h: (..., H) final-layer states (after the final norm, what the LM head reads). Returns (..., H) in the
        embedding table's dtype. emb_norm: ē, computed from the table when None (only read with rescale)."""
        if self.config.rescale:
            target = self.embedding_norm() if emb_norm is None else emb_norm
            h32 = h.float()
            h = h32 * (target.to(h.device) / h32.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return h.to(self.generator.get_input_embeddings().weight.dtype)

    def run(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
            cache: Any) -> torch.Tensor:
        """One pass of the Generator's decoder stack (no head) over `embeds` (B, L, H), appending to `cache`.

        attention_mask: (B, cached + L) or None (no padding anywhere); position_ids: (B, L).
        Returns the final-layer states (B, L, H); gradients flow through `cache` when grad is enabled."""
        base = base_model(self.generator)
        out = base(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=cache is not None, **cache_kwargs(base, cache))
        return out.last_hidden_state

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """The LM head on final-layer states: (B, L, H) -> (B, L, V) (with the model's logit soft-capping, if any)."""
        out = self.generator.get_output_embeddings()(states)
        cap = getattr(self.generator.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    def _check_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra: int,
                       cfg: DecodeConfig) -> None:
        limit = context_limit(self.generator)
        longest = int(attention_mask.long().sum(-1).max())
        if limit is not None and longest + extra + cfg.max_new_tokens > limit:
            raise ValueError(f"prompt of {longest} tokens + {extra} thought positions + max_new_tokens "
                             f"{cfg.max_new_tokens} exceeds the Generator's context of {limit} positions")

    # ------------------------------------------------------------------------------------------------------------
    # decoding: `generate` / `stream` come from GenerationMixin and run `decoder`

    def decode_lms(self) -> list[tuple[str, nn.Module]]:
        return [("Generator", self.generator)]

    def latent_steps(self, generated: int) -> int:
        """Thoughts a row decoded beside `generated` tokens (the N2 of the paper's cost model)."""
        raise NotImplementedError

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """GenerationMixin's generate, then `last_generation_extras`: per row {"latent_steps", "generated_tokens"},
        so benchmarks and predictions can count the extra sequential steps."""
        self.last_generation_extras = None
        new = super().generate(input_ids, attention_mask, **kwargs)
        eos_ids, _ = special_ids(self.generator, decode_config(dict(kwargs)))
        self.last_generation_extras = [{"latent_steps": self.latent_steps(n), "generated_tokens": n}
                                       for n in generated_counts(new, eos_ids)]
        return new

    # ------------------------------------------------------------------------------------------------------------
    # training hooks (flythinker.training.loop.fit)

    def extra_parameters(self) -> nn.Parameter | None:
        """The method's own trainable vectors besides the Generator (Coconut: the markers)."""
        return None

    def trainable_parts(self) -> list[tuple[str, nn.Module]]:
        extra = self.extra_parameters()
        return [("generator", self.generator if extra is None else _GeneratorPart(self.generator, extra))]

    # ------------------------------------------------------------------------------------------------------------
    # persistence

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        """generator/ (a plain HF model, merged if LoRA-wrapped, with the tokenizer and the extra vectors) and
        flythinker.json: {"method", <method>: settings, ...}. The record also carries the no-Reasoner "flythinker"
        section SFT writes, because every checkpoint check (resume, generate, the runner's reuse) reads one."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lm = self.generator
        if hasattr(lm, "merge_and_unload"):  # peft wrapper: save merged full weights so loading needs no peft
            lm = copy.deepcopy(lm).merge_and_unload()
        lm.save_pretrained(path / "generator", safe_serialization=safe_serialization)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path / "generator")
        extra = self.extra_parameters()
        if extra is not None:
            from safetensors.torch import save_file

            save_file({"extra": extra.detach().cpu().contiguous()}, str(path / "generator" / EXTRA_WEIGHTS))
        meta = {"method": self.method_name, self.method_name: self.config.to_dict(),
                "flythinker": FlyThinkerConfig(lam=0.0).to_dict(), "has_reasoner": False, "has_projection": False,
                "calibrated": False, "has_extra": extra is not None, "format_version": 1}
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, config: Any = None,
                        load_tokenizer: bool = True) -> LatentLM:
        """Load a directory written by `save_pretrained`; `config` overrides the saved settings. A directory that is
        not whole, or another method's, fails with one line naming the file."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        meta_file = path / CONFIG_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a saved {cls.method_name} model (no {CONFIG_NAME})")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_file}: not a JSON record ({e})") from None
        if not isinstance(meta, dict) or meta.get("method") != cls.method_name:
            got = meta.get("method", "flythinker/sft") if isinstance(meta, dict) else "?"
            raise ValueError(f"{meta_file}: a {got} checkpoint, not {cls.method_name}")
        try:
            cfg = config or cls.config_class.from_dict(meta.get(cls.method_name) or {})
        except ValueError as e:
            raise ValueError(f"{meta_file}: bad {cls.method_name!r} section ({e})") from None
        gdir = path / "generator"
        if not gdir.is_dir():
            raise FileNotFoundError(f"{gdir}: missing (the checkpoint's Generator)")
        try:
            generator = AutoModelForCausalLM.from_pretrained(gdir, **({"dtype": dtype} if dtype else {}))
        except Exception as e:  # noqa: BLE001 -- OSError, SafetensorError, ValueError: the files are bad
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{gdir}: cannot load the model ({first})") from None
        tokenizer = None
        if load_tokenizer and (gdir / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(gdir)
        model = cls(generator, cfg, tokenizer=tokenizer)
        extra = model.extra_parameters()
        if extra is not None:
            from safetensors.torch import load_file

            f = gdir / EXTRA_WEIGHTS
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (the {cls.method_name} model's extra vectors)")
            try:
                saved = load_file(str(f))["extra"]
            except Exception as e:  # noqa: BLE001 -- SafetensorError / OSError / KeyError: damaged file
                raise ValueError(f"{f}: cannot load ({str(e).strip().splitlines()[0] if str(e).strip() else e!r})") \
                    from None
            if saved.shape != extra.shape:
                raise ValueError(f"{f}: shape {tuple(saved.shape)}, the model needs {tuple(extra.shape)}")
            with torch.no_grad():
                extra.copy_(saved.to(extra.dtype))
        return model


class CoconutModel(LatentLM):
    """The Generator with c continuous thoughts between prompt and response.

    Args:
        generator: any `transformers` causal LM (or a peft wrapper of one).
        config: `CoconutConfig`.
        tokenizer: optional, saved with the model.
    """

    method_name = "coconut"
    config_class = CoconutConfig

    def __init__(self, generator: nn.Module, config: CoconutConfig | None = None, tokenizer: Any = None):
        super().__init__(generator, config or CoconutConfig(), tokenizer)
        table = generator.get_input_embeddings().weight.detach().float()
        # <bot>, <eot>: drawn like embedding rows (the table's per-dimension mean and std), so they start in
        # distribution, and distinct from each other; a private seed makes a fresh model the same every time.
        g = torch.Generator().manual_seed(0)
        init = table.mean(0) + table.std(0) * torch.randn(2, table.shape[1], generator=g).to(table.device)
        self.markers = nn.Parameter(init.to(generator.get_input_embeddings().weight.dtype))    # (2, H)

    def extra_parameters(self) -> nn.Parameter:
        return self.markers

    @property
    def n_thoughts(self) -> int:
        """Thoughts a decode runs: c, or after the curriculum its last stage's K·c (`coconut.stages` · latents)."""
        return self.config.latents * (self.config.stages if self.config.curriculum else 1)

    def latent_steps(self, generated: int) -> int:
        return self.n_thoughts

    def marker(self, which: int, batch: int) -> torch.Tensor:
        """<bot> (0) or <eot> (1) for every row: (B, 1, H)."""
        return self.markers[which].expand(batch, 1, -1)

    def think(self, head: torch.Tensor, tail: torch.Tensor, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor, cache: Any, emb_norm: torch.Tensor | None = None, n: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent chain over one KV cache, in c + 1 passes (training AND the decode prefill):
        [head] -> ẽ_1 = h(<bot>);  [ẽ_k] -> ẽ_{k+1} = h(ẽ_k) for k < c;  [ẽ_c, tail] -> states of the tail.

        head: (B, T0, H) the prompt embeddings then <bot>; tail: (B, L, H) <eot> then (training) the response.
        n: c, the thought columns (default `n_thoughts`). attention_mask: (B, T0 + c + L) over all these columns, or
        None without padding; a row with fewer thoughts (a curriculum batch) has its first thought columns masked,
        and its chain starts at its first unmasked one. position_ids: the same columns (B, T0 + c + L), each row's
        own positions. cache: an empty KV cache, filled here.
        Returns (thoughts ẽ (B, c, H), 0 in masked columns; final-layer states of the tail (B, L, H)).
        """
        c, T0, L = self.n_thoughts if n is None else n, head.shape[1], tail.shape[1]

        def mask_to(end: int) -> torch.Tensor | None:
            return None if attention_mask is None else attention_mask[:, :end]

        if c == 0:
            states = self.run(torch.cat([head, tail], 1), mask_to(T0 + L), position_ids[:, : T0 + L], cache)
            return head.new_zeros(head.shape[0], 0, head.shape[2]), states[:, T0:]
        real = None if attention_mask is None else attention_mask[:, T0: T0 + c].bool()        # (B, c)
        if real is not None and bool(real.all()):
            real = None
        h = self.run(head, mask_to(T0), position_ids[:, :T0], cache)[:, -1]                    # (B, H) h(<bot>)
        thoughts = []
        col = T0
        for k in range(c):
            e = self.feed_back(h, emb_norm)                                                      # (B, H) ẽ_{k+1}
            thoughts.append(e)
            if k < c - 1:   # the next thought needs this one's output: one position per pass
                h_next = self.run(e[:, None], mask_to(col + 1), position_ids[:, col: col + 1], cache)[:, -1]
                # A masked column is no thought of its row (nothing attends to it): the row keeps its last state.
                h = h_next if real is None else torch.where(real[:, k, None], h_next, h)
                col += 1
        x = torch.cat([thoughts[-1][:, None], tail], 1)                                          # (B, 1 + L, H)
        states = self.run(x, mask_to(col + 1 + L), position_ids[:, col: col + 1 + L], cache)
        stacked = torch.stack(thoughts, 1)                                                       # (B, c, H)
        return (stacked if real is None else stacked.masked_fill(~real[..., None], 0)), states[:, 1:]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, response_mask: torch.Tensor | None = None) -> LatentOutput:
        """Teacher-forced training pass: prompt + <bot>, c thoughts, <eot> + response, one KV cache.

        input_ids / attention_mask / labels: (B, T), any padding side (labels -100 on the prompt and padding);
        response_mask: (B, T) response positions (default labels != -100). With the curriculum, each row's thoughts
        are its latent slots (`curriculum_feature`; 0 without) and its "response" is all it supervises (remaining
        reasoning + response); rows with fewer thoughts than the batch's most get masked thought columns first.
        Returns `LatentOutput`, logits (B, 1+R, V) from <eot> on (logits[:, j] predicts response token j);
        thoughts (B, c, H) with c the batch's most.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if response_mask is None:
            if labels is None:
                raise ValueError("coconut's forward needs labels or response_mask: the thoughts go between prompt "
                                 "and response")
            response_mask = labels != IGNORE_INDEX
        pr = split_prompt_response(input_ids, attention_mask, response_mask, labels)
        B = input_ids.shape[0]
        prompt_ids, prompt_mask = pr.prompt_ids, pr.prompt_mask
        if self.config.curriculum:
            prompt_ids, prompt_mask, per_row = take_latent_slots(prompt_ids, prompt_mask)      # per_row (B,)
            c = int(per_row.max()) if B else 0
            if bool((pr.response_ids < 0).any()):
                raise ValueError("coconut curriculum: a latent slot among the supervised tokens")
        else:
            if bool((input_ids == LATENT_SLOT).any()):
                raise ValueError("latent slots in a batch but coconut.curriculum is off (curriculum features "
                                 "need a curriculum model)")
            per_row, c = None, self.config.latents
        head = torch.cat([self.embed(prompt_ids), self.marker(0, B)], 1)                       # (B, P + 1, H)
        tail = torch.cat([self.marker(1, B), self.embed(pr.response_ids)], 1)                  # (B, 1 + R, H)
        ones = prompt_mask.new_ones(B, 1)
        cols = torch.arange(c, device=prompt_mask.device)[None]                                # (1, c)
        # a row's thoughts end at <eot>: one with n < c thoughts has its first c - n thought columns masked
        block = ones.expand(B, c) if per_row is None else (cols >= (c - per_row)[:, None]).long()
        mask = torch.cat([prompt_mask, ones, block, ones, pr.response_mask], 1)                # (B, P + c + 2 + R)
        gaps = not bool(block.all())
        # interior masked columns must not advance a row's positions (position_ids_from_mask only skips leading ones)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if gaps else position_ids_from_mask(mask)
        emb_norm = self.embedding_norm() if self.config.rescale else None
        thoughts, states = self.think(head, tail, None if bool(mask.all()) else mask, positions,
                                      new_cache(self.generator), emb_norm, n=c)
        logits = self.logits(states)                                                           # (B, 1 + R, V)
        # aligned with the tail's inputs [<eot>, y_1..y_R]: the <eot> logits predict y_1
        targets = torch.cat([pr.targets.new_full((B, 1), IGNORE_INDEX), pr.targets], 1)
        loss_sum, n_tokens = next_token_nll(logits, targets)
        loss = loss_sum / n_tokens.clamp_min(1)
        return LatentOutput(loss=loss, logits=logits, loss_sum=loss_sum, n_tokens=n_tokens, thoughts=thoughts)

    def decoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig) -> CoconutStepper:
        self._check_context(input_ids, attention_mask, self.n_thoughts + 2, cfg)
        return CoconutStepper(self, input_ids, attention_mask, cfg)


class CoconutStepper:
    """One Coconut decode (left-padded batch, one KV cache): prefill runs prompt + <bot>, the c thoughts and <eot>
    (`CoconutModel.think`, the training function; c = `n_thoughts`, K·c after a curriculum) and returns the first
    response logits; then one token per step."""

    def __init__(self, model: CoconutModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cfg: DecodeConfig):
        self.model = model
        self.device = device_of(model.generator)
        self.extra = model.n_thoughts + 2                               # <bot>, ẽ_1..c, <eot> take positions too
        self.state = PromptState(input_ids, attention_mask, cfg.max_new_tokens + self.extra, self.device)
        self.cache: Any = None

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        m, s = self.model, self.state
        B = s.ids.shape[0]
        for _ in range(self.extra):
            mask, _ = s.advance()                                                     # (B, T + c + 2)
        positions = torch.cat([s.prompt_pos, s.step_pos[:, : self.extra]], 1)        # (B, T + c + 2)
        head = torch.cat([m.embed(s.ids), m.marker(0, B)], 1)                        # (B, T + 1, H)
        emb_norm = m.embedding_norm() if m.config.rescale else None
        self.cache = new_cache(m.generator)
        _, states = m.think(head, m.marker(1, B), mask, positions, self.cache, emb_norm)  # (B, 1, H) at <eot>
        return m.logits(states[:, -1:])[:, -1].float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        mask, pos = self.state.advance()
        states = self.model.run(self.model.embed(tokens[:, None]), mask, pos, self.cache)  # (B, 1, H)
        return self.model.logits(states)[:, -1].float()

    def close(self) -> None:
        pass


def check_cache_training(args: ModelArgs, name: str) -> None:
    """Latent methods train through the KV cache of their thought passes; HF's gradient checkpointing turns the
    cache off in training, so it is refused rather than silently changing what is computed."""
    if args.gradient_checkpointing:
        raise UserError(f"model.gradient_checkpointing is not supported by {name}: its training passes share a KV "
                        f"cache, which Hugging Face's checkpointing disables; set it to false")


class Coconut(Method):
    name = "coconut"
    display = "Coconut"
    trained = True
    uses_reasoner = False
    description = "the Generator alone, c continuous thoughts (its own last hidden states) before the response"

    def model_args(self, args: ModelArgs) -> ModelArgs:
        return dataclasses.replace(args, method=self.name)

    @staticmethod
    def settings(args: ModelArgs) -> CoconutConfig:
        """`args.coconut` when ModelArgs has that section, else the defaults."""
        return getattr(args, "coconut", None) or CoconutConfig()

    def from_lms(self, generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs,
                 tokenizer: Any = None) -> nn.Module:
        """The Generator alone; a given Reasoner is ignored."""
        check_cache_training(args, self.name)
        generator, _ = setup_lms(generator, None, args)
        return CoconutModel(generator, self.settings(args), tokenizer=tokenizer)

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        return CoconutModel.from_pretrained(path, dtype=dtype)

    def features(self, examples: Sequence[Example], tokenizer: Any, data: DataConfig, args: ModelArgs | None = None,
                 data_path: str | Path | None = None, store: Any = None) -> list[dict[str, Any]]:
        """Without the curriculum: prompt + response ids, as every method (`Method.features`). With it: every
        stage k = 0..K of every example (`curriculum_feature`), stage by stage, each carrying its "stage" (the
        trainer takes lower stages first in every epoch). The reasoning is the teacher's text (`coconut.teacher`),
        cached next to `data_path` (or at `teacher.cache`) like CoT's, and split into sentences, each a step."""
        cfg = self.settings(args) if args is not None else CoconutConfig()
        if not cfg.curriculum:
            return super().features(examples, tokenizer, data, args, data_path)
        from ..data.collate import encode_example
        from .teachers import cache_path, make_teacher, teacher_inputs, teacher_texts

        teacher = make_teacher(cfg.teacher, generator=getattr(args, "generator", None) or "default")
        texts = teacher_texts(teacher, teacher_inputs(examples, tokenizer, data, store=store),
                              cache_path(cfg.teacher, data_path))
        rows = []
        for ex, text in zip(examples, texts, strict=True):
            enc = encode_example(ex, tokenizer, data, with_response=True, store=store)
            # each step tokenized on its own, so dropping the first k is a cut between token ids
            steps = [ids for s in reasoning_steps(text) if (ids := list(tokenizer.encode(s, add_special_tokens=False)))]
            rows.append((enc["prompt_ids"], steps, enc["response_ids"]))
        return [curriculum_feature(p, steps, r, k, cfg.latents, last=k == cfg.stages)
                for k in range(cfg.stages + 1) for p, steps, r in rows]


__all__ = ["LATENT_SLOT", "Coconut", "CoconutConfig", "CoconutModel", "CoconutStepper", "LatentLM", "LatentOutput",
           "PromptResponse", "curriculum_feature", "generated_counts", "reasoning_steps", "split_prompt_response",
           "take_latent_slots"]
