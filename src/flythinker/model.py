"""The FlyThinker model: a Reasoner R and a Generator G (any two HF causal LMs sharing token ids) and the one fusion
function that feeds R's latent states into G's input embeddings (paper Eq. 4-9, Algorithm 1, Appendix G).

Owns: reasoning (`reason`, Eq. 4/7), the shift r_{i-1} -> position i (`shift_states`), where fusion applies
(`fusion_mask`, scope), the fusion itself (`fuse`, Eq. 6), the teacher-forced forward and loss (Eq. 8-9),
vocabulary checks, save/load, and `truncated_reasoner` (a Reasoner cut from the Generator's first k layers).
The decode engine (`flythinker.generation`) calls these same functions; there is no second implementation.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import FlyThinkerConfig

IGNORE_INDEX = -100
CONFIG_NAME = "flythinker.json"
FUSION_WEIGHTS = "fusion.safetensors"


@dataclass
class FlyThinkerOutput:
    """Result of a teacher-forced forward pass.

    loss: mean next-token NLL over supervised tokens (scalar) or None without labels.
    loss_sum / n_tokens: the summed NLL and the count it averages over, so a trainer can normalise a gradient-
        accumulation window by its total supervised-token count instead of averaging per-batch means.
    logits: (B, T, V) Generator logits.
    reasoner_states: (B, T, H_R) R's final-layer states r_i (unshifted), or None when fusion is off.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    loss_sum: torch.Tensor | None = None
    n_tokens: torch.Tensor | None = None
    reasoner_states: torch.Tensor | None = None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) positions starting at 0 on each row's first real token, so left padding does not
    shift RoPE; rows without left padding get exactly arange(T), as a plain HF forward uses."""
    first = attention_mask.long().argmax(-1, keepdim=True)                              # (B, 1) leading pads
    pos = torch.arange(attention_mask.shape[-1], device=attention_mask.device).unsqueeze(0)
    return (pos - first).clamp(min=0)


def _hf_mask_args(attention_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask, position_ids) to hand to an HF model. Without padding both are None: HF then takes its fused causal
    attention path (an explicit all-ones mask costs ~5% in a CPU training step for no change in the result)."""
    if bool(attention_mask.all()):
        return None, None
    return attention_mask, position_ids_from_mask(attention_mask)


def _base_model(lm: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (avoids computing (B, T, V) logits for the Reasoner)."""
    get = getattr(lm, "get_decoder", None)
    base = get() if callable(get) else None
    if base is None:
        base = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if base is None:
        raise TypeError(f"cannot find the decoder stack of {type(lm).__name__}")
    return base


def cache_kwargs(lm: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for an HF forward call, where name is the KV-cache keyword `lm.forward` takes: `cache` from
    transformers 5.24 on (where `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before.
    Read from the signature of the unwrapped (non-PEFT) class, once per class."""
    base = lm.get_base_model() if callable(getattr(lm, "get_base_model", None)) else lm
    return {_cache_keyword(type(base)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache an HF forward returned (`cache` from transformers 5.24 on, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _embedding_rows(lm: nn.Module) -> int:
    return lm.get_input_embeddings().num_embeddings


def _hidden_size(lm: nn.Module) -> int:
    return lm.get_input_embeddings().embedding_dim


class FlyThinker(nn.Module):
    """Generator + optional Reasoner. `reasoner=None` (or lam=0) is exactly the plain Generator (the SFT baseline).

    Args:
        generator: any `transformers` causal LM (PreTrainedModel, or a peft wrapper of one).
        reasoner: another causal LM embedding the same token ids, or None.
        config: fusion settings (λ, scope, rescaling, width handling).
        tokenizer / reasoner_tokenizer: optional; when given, their vocabularies are checked to be identical and the
            tokenizer's length bounds the ids that can occur (so padded embedding tables of different sizes pass).
    """

    def __init__(self, generator: nn.Module, reasoner: nn.Module | None = None,
                 config: FlyThinkerConfig | None = None, tokenizer: Any = None, reasoner_tokenizer: Any = None):
        super().__init__()
        self.config = config or FlyThinkerConfig()
        self.generator = generator
        self.reasoner = reasoner
        self.tokenizer = tokenizer
        self.projection: nn.Linear | None = None
        if reasoner is not None:
            check_vocabularies(generator, reasoner, tokenizer, reasoner_tokenizer)
            d_r, d_g = _hidden_size(reasoner), _hidden_size(generator)
            if d_r != d_g:
                if self.config.width_mode == "pad" and d_r > d_g:
                    raise ValueError(f"width_mode='pad' needs d_R <= d_G; got Reasoner width {d_r} > Generator "
                                     f"width {d_g} (use width_mode='project')")
                if self.config.width_mode == "project":
                    # Initialised to the official zero-padded add (identity into the first d_R dims, or a
                    # truncation when d_R > d_G), so training starts from the reference behaviour and can learn
                    # a better map; a random init would inject noise at step 0.
                    self.projection = nn.Linear(d_r, d_g, bias=False)
                    with torch.no_grad():
                        self.projection.weight.zero_()
                        n = min(d_r, d_g)
                        self.projection.weight[:n, :n] = torch.eye(n)
                    p = next(generator.parameters())
                    self.projection.to(device=p.device, dtype=p.dtype)
            # Statistics of R's final-layer states for config.normalize (set by `calibrate`, saved with the model;
            # r_count = calibration tokens, 0 = not calibrated). fp32 whatever the models' dtype.
            dev = next(reasoner.parameters()).device
            self.register_buffer("r_mean", torch.zeros(d_r, device=dev))
            self.register_buffer("r_std", torch.ones(d_r, device=dev))
            self.register_buffer("r_count", torch.zeros((), device=dev))

    # ------------------------------------------------------------------------------------------------------------
    # the paper's equations, one function each

    @property
    def fusion_enabled(self) -> bool:
        return self.reasoner is not None and self.config.lam != 0

    def reason(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, past_key_values: Any = None,
               use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """Eq. 4 / 7: r_i = R^{(-1)}(h, x, y_<i)[i], R's final-layer state at every input position.

        input_ids: (B, T); attention_mask: (B, T_past + T). Returns (states (B, T, H_R), updated cache or None).
        """
        assert self.reasoner is not None
        if attention_mask is not None and position_ids is None and past_key_values is None:
            attention_mask, position_ids = _hf_mask_args(attention_mask)
        base = _base_model(self.reasoner)
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=use_cache, **cache_kwargs(base, past_key_values))
        return out.last_hidden_state, (output_cache(out) if use_cache else None)

    @staticmethod
    def shift_states(states: torch.Tensor) -> torch.Tensor:
        """Algorithm 1 line 4: the state at position i-1 feeds position i; position 0 gets zeros.

        states: (B, T, H_R) -> (B, T, H_R).
        """
        return F.pad(states[:, :-1], (0, 0, 1, 0))

    def fusion_mask(self, attention_mask: torch.Tensor, response_mask: torch.Tensor | None = None,
                    prev_attention: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) float mask of the positions that receive λ·r_{i-1}.

        A position is fused only when it and its predecessor are real tokens: the first real token of a left-padded
        row (whose predecessor is padding) stays unfused exactly like position 0, which makes a padded row identical
        to the same prompt alone. `scope` then keeps all ("global"), prompt-only ("input": response_mask == 0) or
        response-only ("output": response_mask == 1) positions. `prev_attention` (B,) is the mask of the token
        just before column 0 (incremental decoding); without it column 0 counts as the sequence start.
        """
        m = attention_mask.bool()
        prev = F.pad(m[:, :-1], (1, 0), value=False)
        if prev_attention is not None:
            prev[:, 0] = prev_attention.bool()
        keep = m & prev
        scope = self.config.scope
        if scope != "global":
            if response_mask is None:
                raise ValueError(f"scope={scope!r} needs response positions: pass labels or response_mask")
            resp = response_mask.bool()
            keep = keep & (resp if scope == "output" else ~resp)
        return keep.to(torch.float32)

    @property
    def calibrated(self) -> bool:
        return self.reasoner is not None and bool(self.r_count.item() > 0)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Set r_mean / r_std (H_R,) to the mean and std of R's final-layer states over the real tokens of
        `batches`, an iterable of (input_ids (B, T), attention_mask (B, T)). Used by config.normalize; computed
        once from the untrained Reasoner and then fixed, so training and decoding apply the same affine map.
        Returns the number of tokens seen."""
        assert self.reasoner is not None, "calibrate needs a Reasoner"
        was_training = self.reasoner.training
        self.reasoner.eval()
        total = total_sq = None
        n = 0
        for ids, mask in batches:
            ids = ids.to(self.r_mean.device)
            mask = mask.to(ids.device)
            states, _ = self.reason(ids, mask)                                        # (B, T, H_R)
            x = states[mask.bool()].double()                                            # (N, H_R)
            total = x.sum(0) if total is None else total + x.sum(0)
            total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
            n += x.shape[0]
        self.reasoner.train(was_training)
        if n < 2:
            raise ValueError("calibrate needs at least two real tokens")
        mean = total / n
        var = (total_sq / n - mean * mean).clamp_min(0)
        self.r_mean.copy_(mean.float())
        self.r_std.copy_(var.sqrt().clamp_min(1e-6).float())
        self.r_count.fill_(n)
        return n

    def normalize_states(self, states: torch.Tensor) -> torch.Tensor:
        """config.normalize: (r - mean) or (r - mean) / std per dimension, in fp32; identity for "none".

        states: (B, T, H_R) -> (B, T, H_R)."""
        if self.config.normalize == "none":
            return states
        r = states.float() - self.r_mean.to(states.device)
        if self.config.normalize == "standardize":
            r = r / self.r_std.to(states.device)
        return r

    def embedding_norm(self) -> torch.Tensor:
        """Mean L2 norm of the Generator's input-embedding rows (scalar, detached: a target scale, not a path for
        gradients). One vocabulary-wide constant, so teacher forcing and incremental decoding rescale identically."""
        w = self.generator.get_input_embeddings().weight.detach()
        return w.float().norm(dim=-1).mean()

    def fuse(self, token_embeds: torch.Tensor, prev_states: torch.Tensor, mask: torch.Tensor,
             emb_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 6: e(x_i) + λ · rescale(proj(r_{i-1})) at the masked positions. Used by training AND decoding.

        token_embeds: (B, T, H_G) Generator embeddings e(x_i).
        prev_states: (B, T, H_R) the Reasoner state of the PREVIOUS position, already aligned to i.
        mask: (B, T) 1 where fusion applies (see `fusion_mask`).
        emb_norm: the target norm (scalar); computed from the embedding table when None.
        Returns (B, T, H_G).
        """
        r = self.normalize_states(prev_states.to(device=token_embeds.device))               # (B, T, H_R)
        if r.shape[-1] != token_embeds.shape[-1]:
            if self.projection is not None:
                r = self.projection(r.to(self.projection.weight.dtype))                 # (B, T, H_G)
            else:                                                                         # official zero-pad
                r = F.pad(r, (0, token_embeds.shape[-1] - r.shape[-1]))                   # (B, T, H_G)
        r = r.float()
        if self.config.rescale:
            target = self.embedding_norm() if emb_norm is None else emb_norm
            # R's raw final-layer states are ~10-100x larger than token embeddings; unscaled they would swamp e(x).
            r = r * (target.to(r.device) / r.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        add = self.config.lam * r * mask.to(r.device, torch.float32).unsqueeze(-1)      # (B, T, H_G)
        return token_embeds + add.to(token_embeds.dtype)

    def fused_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_mask: torch.Tensor | None = None,
                         reasoner_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1 lines 1-4 over whole sequences (training, and the decode engine's prefill).

        input_ids, attention_mask, response_mask: (B, T). Returns (inputs_embeds (B, T, H_G), states (B, T, H_R)).
        """
        if self.config.normalize != "none" and not self.calibrated:
            raise ValueError(f"normalize={self.config.normalize!r} needs Reasoner statistics: call "
                             "FlyThinker.calibrate(...) first (the trainer does it before step 1)")
        if reasoner_states is None:
            reasoner_states, _ = self.reason(input_ids, attention_mask)                 # (B, T, H_R)
        emb = self.generator.get_input_embeddings()(input_ids)                          # (B, T, H_G)
        mask = self.fusion_mask(attention_mask, response_mask)                          # (B, T)
        return self.fuse(emb, self.shift_states(reasoner_states), mask), reasoner_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, response_mask: torch.Tensor | None = None) -> FlyThinkerOutput:
        """Eq. 8-9: one teacher-forced pass of R, one of G on the fused embeddings, NLL on labelled tokens.

        input_ids: (B, T); attention_mask: (B, T) (ones when None); labels: (B, T), -100 where unsupervised
        (HF convention: aligned with input_ids, shifted inside); response_mask: (B, T) response positions for
        scope "input"/"output" (derived from labels != -100 when None).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must have the same shape")
        hf_mask, position_ids = _hf_mask_args(attention_mask)
        states = None
        if self.fusion_enabled:
            if response_mask is None and labels is not None:
                response_mask = labels != IGNORE_INDEX
            embeds, states = self.fused_embeddings(input_ids, attention_mask, response_mask)
            out = self.generator(inputs_embeds=embeds, attention_mask=hf_mask, position_ids=position_ids)
        else:
            out = self.generator(input_ids=input_ids, attention_mask=hf_mask, position_ids=position_ids)
        logits = out.logits                                                             # (B, T, V)
        loss = loss_sum = n_tokens = None
        if labels is not None:
            loss_sum, n_tokens = next_token_nll(logits, labels)
            loss = loss_sum / n_tokens.clamp_min(1)
        return FlyThinkerOutput(loss=loss, logits=logits, loss_sum=loss_sum, n_tokens=n_tokens,
                                reasoner_states=states)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """KV-cached Reasoner||Generator decoding (Algorithm 2); see `flythinker.generation.generate`.

        Returns a LongTensor (B, N) of new tokens only, rows padded with pad_token_id after their EOS."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # persistence

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        """HF-style directory: generator/, reasoner/ (if any), flythinker.json, fusion.safetensors (if projected),
        and the tokenizer inside generator/ (so `AutoTokenizer.from_pretrained(path/'generator')` works).
        LoRA-wrapped sub-models are saved merged, so the directory loads without peft."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _save_lm(self.generator, path / "generator", safe_serialization)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path / "generator")
        if self.reasoner is not None:
            _save_lm(self.reasoner, path / "reasoner", safe_serialization)
        calibrated = self.calibrated
        meta = {"flythinker": self.config.to_dict(), "has_reasoner": self.reasoner is not None,
                "has_projection": self.projection is not None, "calibrated": calibrated, "format_version": 1}
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        tensors = {}
        if self.projection is not None:
            tensors["projection.weight"] = self.projection.weight.detach().cpu().contiguous()
        if calibrated:
            tensors.update({k: getattr(self, k).detach().cpu().contiguous() for k in ("r_mean", "r_std", "r_count")})
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(path / FUSION_WEIGHTS))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        config: FlyThinkerConfig | None = None, load_tokenizer: bool = True) -> "FlyThinker":
        """Load a directory written by `save_pretrained` (or a trainer checkpoint). `config` overrides the saved one
        (e.g. another λ at inference)."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        meta_file = path / CONFIG_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a FlyThinker directory (no {CONFIG_NAME})")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_file}: invalid JSON ({e.msg} at line {e.lineno})") from None
        cfg = config or FlyThinkerConfig.from_dict(meta["flythinker"])
        kw = {"dtype": dtype} if dtype is not None else {}
        generator = AutoModelForCausalLM.from_pretrained(path / "generator", **kw)
        reasoner = AutoModelForCausalLM.from_pretrained(path / "reasoner", **kw) if meta.get("has_reasoner") else None
        tokenizer = None
        if load_tokenizer and (path / "generator" / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path / "generator")
        model = cls(generator, reasoner, cfg, tokenizer=tokenizer)
        if meta.get("has_projection") and model.projection is None:
            raise ValueError(f"{path}: saved with a projection but the configured width_mode has none")
        if meta.get("has_projection") or meta.get("calibrated"):
            from safetensors.torch import load_file

            saved = load_file(str(path / FUSION_WEIGHTS))
            with torch.no_grad():
                if meta.get("has_projection"):
                    w = saved["projection.weight"]
                    model.projection.weight.copy_(w.to(model.projection.weight.dtype))
                if meta.get("calibrated"):
                    for k in ("r_mean", "r_std", "r_count"):
                        getattr(model, k).copy_(saved[k])
        return model


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 summed: -Σ log P(y_t | ...) over labelled targets. logits (B, T, V), labels (B, T) aligned with inputs.

    Returns (sum of NLL (scalar, fp32), number of supervised tokens (scalar long))."""
    shift_logits = logits[:, :-1].float()                                                # (B, T-1, V)
    shift_labels = labels[:, 1:].to(logits.device)                                       # (B, T-1)
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


def check_vocabularies(generator: nn.Module, reasoner: nn.Module, tokenizer: Any = None,
                       reasoner_tokenizer: Any = None) -> None:
    """Raise a one-line ValueError unless every token id the Generator can see also indexes the Reasoner's table.

    Padded tables of different sizes (Qwen2.5 0.5B vs 7B: 151936 vs 152064 rows, 151665 real tokens) are fine as
    long as the real vocabulary (the tokenizer's length when known) fits in both."""
    g_rows, r_rows = _embedding_rows(generator), _embedding_rows(reasoner)
    if tokenizer is not None and reasoner_tokenizer is not None:
        gv, rv = tokenizer.get_vocab(), reasoner_tokenizer.get_vocab()
        if gv != rv:
            raise ValueError(f"Generator and Reasoner tokenizers differ (Generator {len(gv)} tokens, Reasoner "
                             f"{len(rv)} tokens): FlyThinker needs both models to embed the same token ids")
    n_ids = len(tokenizer) if tokenizer is not None else g_rows
    if n_ids > g_rows:
        raise ValueError(f"tokenizer has {n_ids} tokens but the Generator's vocabulary has only {g_rows} rows")
    if n_ids > r_rows:
        raise ValueError(f"Reasoner vocabulary size {r_rows} is smaller than the Generator's {n_ids} token ids: "
                         f"FlyThinker needs both models to embed the same token ids")


def _save_lm(lm: nn.Module, path: Path, safe_serialization: bool) -> None:
    if hasattr(lm, "merge_and_unload"):  # peft wrapper: save merged full weights so loading needs no peft
        lm = copy.deepcopy(lm).merge_and_unload()
    lm.save_pretrained(path, safe_serialization=safe_serialization)


def truncated_reasoner(generator: nn.Module, num_layers: int) -> nn.Module:
    """A Reasoner made of the Generator's embeddings, first `num_layers` decoder layers, final norm and head.

    It is a copy with its own weights (updating one model never touches the other) and shares the tokenizer.
    Works for any HF causal LM whose layers live under `...layers.<i>.` and whose config has `num_hidden_layers`.
    """
    cfg = copy.deepcopy(generator.config)
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"{type(generator).__name__}: config has no num_hidden_layers")
    if not 1 <= num_layers <= n:
        raise ValueError(f"num_layers must be in [1, {n}] for this Generator; got {num_layers}")
    cfg.num_hidden_layers = num_layers
    for attr in ("layer_types",):  # per-layer lists (sliding/full attention) must match the new depth
        v = getattr(cfg, attr, None)
        if isinstance(v, list):
            setattr(cfg, attr, v[:num_layers])
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    reasoner = type(generator)(cfg)
    layer_re = re.compile(r"(^|\.)layers\.(\d+)\.")
    src = {}
    for k, v in generator.state_dict().items():
        m = layer_re.search(k)
        if m is None or int(m.group(2)) < num_layers:
            src[k] = v.detach().clone()
    missing, unexpected = reasoner.load_state_dict(src, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"truncated_reasoner: weights did not line up (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    p = next(generator.parameters())
    reasoner.to(device=p.device, dtype=p.dtype)
    if getattr(generator, "generation_config", None) is not None:
        reasoner.generation_config = copy.deepcopy(generator.generation_config)
    return reasoner
