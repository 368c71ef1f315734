"""CoS, context steering (He et al., ICLR 2025, "Context Steering: Controllable Personalization at Inference
Time"): a tuning-free baseline. At every decode step the untrained Generator runs twice, once on the prompt with the
user's history (RAG's) and once on the prompt without it (Non-personalized's), and the next token is drawn from

    log p_CoS(y_t) ∝ lp_ctx(y_t) + λ_cos · (lp_ctx(y_t) - lp_noctx(y_t))            (`steer_log_probs`)

so λ_cos = 0 is exactly the RAG Generator, λ_cos > 0 amplifies what the history changes and λ_cos < 0 damps it.

Owns the mixing rule (`steer_log_probs`), the two-cache decode step (`CoSStepper`: two `CausalLMStepper` states of
one model, batched with left padding, their two calls per step run by the decode engine's backend,
`decoding.concurrency`), the model (`CoSModel`: the SFT layout plus a "cos" section; it builds both prompts for the
`inference.Predictor` through `encode_prompts`) and the registry entry (`CoS`).

The second prompt reaches the decode as `generate(..., plain_input_ids=, plain_attention_mask=)`; `generate` and
`stream` refuse to run without it, and `decoder(...)` takes it by the same keywords (the server's continuous batch).
Only the bare loop protocol (`decoder(input_ids, attention_mask, cfg)`, what the timing benchmarks call) has no room
for it: there the history-free cache reads the same prompt, which costs what CoS costs (two cached passes per
token) but steers nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.config import DataConfig
from ..decoding import concurrency, loop
from ..decoding.concurrency import Call
from ..decoding.loop import CausalLMStepper, check_inputs
from ..decoding.sampling import DecodeConfig, decode_config
from .base import Method, ModelArgs, setup_lms
from .configs import CoSConfig
from .flythinker.model import CONFIG_NAME, FlyThinker

COS_FORMAT = 1


def steer_log_probs(logits_ctx: torch.Tensor, logits_noctx: torch.Tensor, lam: float) -> torch.Tensor:
    """The CoS next-token scores: lp_ctx + λ·(lp_ctx - lp_noctx), unnormalised (the sampler's softmax
    normalises; temperature, top-k and top-p then act on the steered distribution).

    Args:
        logits_ctx: (B, V) logits with the user's history in the prompt.
        logits_noctx: (B, V) logits of the same rows without it.
        lam: λ_cos.
    Returns (B, V) fp32 log-scores; with lam = 0 they are log_softmax(logits_ctx), the plain Generator's."""
    lp_ctx = F.log_softmax(logits_ctx.float(), dim=-1)                              # (B, V)
    lp_noctx = F.log_softmax(logits_noctx.float(), dim=-1)                          # (B, V)
    return lp_ctx + lam * (lp_ctx - lp_noctx)


class CoSStepper:
    """One CoS decode: two KV caches of the same Generator, one over the with-history prompt and one over the
    history-free prompt (each left-padded on its own; same rows, same tokens fed), mixed by `steer_log_probs`.

    The two calls of a step share nothing but the fed token, so the decode backend may overlap them (threads on
    CPU, a side CUDA stream on one GPU); the history-free call is the "side" call."""

    def __init__(self, lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 plain_ids: torch.Tensor, plain_mask: torch.Tensor, cfg: DecodeConfig, lam: float):
        if plain_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"CoS: {input_ids.shape[0]} prompts with history but {plain_ids.shape[0]} without")
        self.lam = float(lam)
        self.ctx = CausalLMStepper(lm, input_ids, attention_mask, cfg)
        self.noctx = CausalLMStepper(lm, plain_ids, plain_mask, cfg)
        self.device = dev = self.ctx.device
        name = concurrency.resolve_backend(dev, dev, cfg.concurrent)
        if name == "process":  # its two calls share one model and the token column: nothing for a worker process
            raise ValueError("CoS: decode backend 'process' runs a Reasoner in a worker process and CoS has none; "
                             "use threads, sequential or auto")
        # Two calls of one model: equal cost, so "threads" splits the cores evenly (macs 1:1).
        self.backend = concurrency.make_backend(name, dev, dev, cfg.cpu_threads, macs=lambda: (1, 1))
        s = self.noctx.state
        self._side_inputs = (s.ids, s.mask, s.prompt_pos, s.step_pos)  # made on the main stream, read on the side

    def prefill(self) -> torch.Tensor:
        # A stream backend's prefill_side returns (states, cache); the history-free logits take the first slot.
        side = Call(lambda: (self.noctx.prefill(), None), *self._side_inputs)
        noctx, _ = self.backend.prefill_side(side)                                  # (B, V)
        return steer_log_probs(self.ctx.prefill(), noctx, self.lam)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        side = Call(lambda: self.noctx.step(tokens), tokens, *self._side_inputs)
        noctx, ctx = self.backend.step(side, lambda: self.ctx.step(tokens))        # (B, V) each
        return steer_log_probs(ctx, noctx, self.lam)

    def close(self) -> None:
        self.backend.close()


class _Steered:
    """The model bound to one batch's history-free prompts: a `Decodable` for the shared loop (whose `decoder`
    receives only the with-history prompt)."""

    def __init__(self, model: CoSModel, plain_ids: torch.Tensor, plain_mask: torch.Tensor):
        self.model, self.plain_ids, self.plain_mask = model, plain_ids, plain_mask

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> _Steered:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> _Steered:
        self.model.train(mode)
        return self

    def decode_lms(self) -> list[tuple[str, nn.Module]]:
        return self.model.decode_lms()

    def decoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig) -> CoSStepper:
        return CoSStepper(self.model.generator, input_ids, attention_mask, self.plain_ids, self.plain_mask, cfg,
                          self.model.cos.lam)


class CoSModel(FlyThinker):
    """The untrained Generator (FlyThinker without a Reasoner, saved in the SFT layout) decoded with context
    steering. `forward` is the plain teacher-forced pass (CoS trains nothing).

    Args:
        generator: any HF causal LM.
        config: CoS settings (defaults when None).
        tokenizer: saved with the model; the Predictor's `encode_prompts` uses the one it is given.
    """

    def __init__(self, generator: nn.Module, config: CoSConfig | None = None, tokenizer: Any = None):
        super().__init__(generator, None, None, tokenizer=tokenizer)
        self.cos = config or CoSConfig()

    # -- prompts: both of them, for `inference.Predictor`

    def encode_prompts(self, examples: Sequence[Any], tokenizer: Any, data: DataConfig,
                       store: Any = None) -> dict[str, torch.Tensor]:
        """Left-padded prompts with the history (`data`, RAG's) and without it (`data` with retrieval "none":
        Non-personalized's): {"input_ids", "attention_mask", "plain_input_ids", "plain_attention_mask"}, (B, T)
        and (B, T') LongTensors."""
        from ..data.collate import collate, encode_example, pad_token_id

        pad = pad_token_id(tokenizer)
        plain_cfg = dataclasses.replace(data, retrieval="none", k=0)
        out = {}
        for prefix, cfg in (("", data), ("plain_", plain_cfg)):
            feats = [encode_example(ex, tokenizer, cfg, with_response=False, store=store) for ex in examples]
            enc = collate(feats, pad, padding_side="left")
            out[f"{prefix}input_ids"], out[f"{prefix}attention_mask"] = enc["input_ids"], enc["attention_mask"]
        return out

    # -- decoding

    def decoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig,
                plain_input_ids: torch.Tensor | None = None,
                plain_attention_mask: torch.Tensor | None = None) -> CoSStepper:
        """The loop-protocol decoder. With plain_input_ids / plain_attention_mask (the server's continuous batch
        passes them) it steers; without them (the bare loop: timing) both caches read `input_ids`: CoS's cost,
        RAG's output. `generate` / `stream` steer."""
        if plain_input_ids is None:
            plain_input_ids, plain_attention_mask = input_ids, attention_mask
        elif plain_attention_mask is None:
            plain_attention_mask = torch.ones_like(plain_input_ids)
        return CoSStepper(self.generator, input_ids, attention_mask, plain_input_ids, plain_attention_mask, cfg,
                          self.cos.lam)

    def _bound(self, input_ids: torch.Tensor, plain_input_ids: torch.Tensor | None,
               plain_attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> _Steered:
        if plain_input_ids is None:
            raise ValueError("CoS decodes two prompts: pass plain_input_ids (and plain_attention_mask), the "
                             "prompts without the user's history (CoSModel.encode_prompts builds both)")
        if plain_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"plain_input_ids has {plain_input_ids.shape[0]} rows, input_ids {input_ids.shape[0]}")
        mask = check_inputs(self.decode_lms(), plain_input_ids, plain_attention_mask, decode_config(kwargs))
        return _Steered(self, plain_input_ids, mask)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 plain_input_ids: torch.Tensor | None = None, plain_attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """New tokens (B, N), rows padded after their EOS. input_ids / attention_mask: (B, T) left-padded prompts
        with the history; plain_*: (B, T') the same rows without it. kwargs: `DecodeConfig` fields."""
        bound = self._bound(input_ids, plain_input_ids, plain_attention_mask, kwargs)
        return loop.generate(bound, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               plain_input_ids: torch.Tensor | None = None, plain_attention_mask: torch.Tensor | None = None,
               **kwargs: Any):
        """Yields each new token column (B,) as it is picked; arguments as `generate`."""
        bound = self._bound(input_ids, plain_input_ids, plain_attention_mask, kwargs)
        return loop.stream(bound, input_ids, attention_mask, **kwargs)

    # -- persistence: the SFT layout plus a "cos" section (so a checkpoint fingerprint covers λ)

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        from ..safeio import atomic_write_text

        super().save_pretrained(path, safe_serialization)
        meta_file = Path(path) / CONFIG_NAME
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        meta["method"] = "cos"
        meta["cos"] = {"config": self.cos.to_dict(), "format_version": COS_FORMAT}
        atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, config: CoSConfig | None = None,
                        load_tokenizer: bool = True) -> CoSModel:
        """A directory written by `save_pretrained` (`config` overrides the saved λ), or any SFT-layout directory
        (a plain Generator), which gets `config` or the defaults."""
        path = Path(path)
        base = FlyThinker.from_pretrained(path, dtype=dtype, load_tokenizer=load_tokenizer)
        if base.reasoner is not None:
            raise ValueError(f"{path}: CoS steers the Generator alone, but this checkpoint has a Reasoner")
        section = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get("cos")
        saved = None
        if section is not None:
            if not isinstance(section, dict) or not isinstance(section.get("config"), dict):
                raise ValueError(f"{path / CONFIG_NAME}: bad 'cos' section")
            try:
                saved = CoSConfig.from_dict(section["config"])
            except ValueError as e:
                raise ValueError(f"{path / CONFIG_NAME}: bad 'cos' section ({e})") from None
        return cls(base.generator, config or saved, tokenizer=base.tokenizer)


class CoS(Method):
    name = "cos"
    display = "CoS"
    trained = False
    description = "the untrained Generator, its next-token log-probs steered by the history's influence (λ_cos)"

    def model_args(self, args: ModelArgs) -> ModelArgs:
        # ModelArgs.method names a trainable method; like RAG, CoS builds the plain Generator (method "sft").
        return dataclasses.replace(args, method="sft")

    def from_lms(self, generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs,
                 tokenizer: Any = None) -> nn.Module:
        """The Generator alone (a given Reasoner is ignored), steered with `args.cos`."""
        generator, _ = setup_lms(generator, None, args)
        cfg = getattr(args, "cos", None)
        return CoSModel(generator, cfg if isinstance(cfg, CoSConfig) else None, tokenizer=tokenizer)

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        return CoSModel.from_pretrained(path, dtype=dtype)


__all__ = ["CoS", "CoSModel", "CoSStepper", "steer_log_probs"]
