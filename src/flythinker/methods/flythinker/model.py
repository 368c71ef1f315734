"""The FlyThinker model: a Reasoner R and a Generator G (any two HF causal LMs sharing token ids) and the one fusion
function that feeds R's latent states into G's input embeddings (paper Eq. 4-9, Algorithm 1, Appendix G).

Owns: reasoning (`reason`, Eq. 4/7), the shift r_{i-1} -> position i (`shift_states`), where fusion applies
(`fusion_mask`, scope), the fusion itself (`fuse`, Eq. 6, with the optional tanh gate of `FusionGate`), the
teacher-forced forward and loss (Eq. 8-9),
the training hooks (`trainable_parts`, `prepare_training`), the decode hooks (`decode_lms`, `decoder`), save/load.
Its decode step (`decode.py`) calls these same functions; there is no second implementation.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.collate import IGNORE_INDEX, collate
from ...decoding.loop import GenerationMixin
from ...decoding.sampling import DecodeConfig
from ...hf import base_model, cache_kwargs, hf_mask_args, hidden_size, output_cache, whole_params
from ...models import check_vocabularies
from ...utils import UserError
from ..base import next_token_nll
from .config import FlyThinkerConfig
from .decode import FlyThinkerStepper

CONFIG_NAME = "flythinker.json"
FUSION_WEIGHTS = "fusion.safetensors"


@dataclass
class FlyThinkerOutput:
    """Result of a teacher-forced forward pass.

    loss: mean next-token NLL over supervised tokens (scalar) or None without labels.
    loss_sum / n_tokens: the summed NLL and the count it averages over, so a trainer can normalize a gradient-
        accumulation window by its total supervised-token count instead of averaging per-batch means.
    logits: (B, T, V) Generator logits.
    reasoner_states: (B, T, H_R) R's final-layer states r_i (unshifted), or None when fusion is off.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    loss_sum: torch.Tensor | None = None
    n_tokens: torch.Tensor | None = None
    reasoner_states: torch.Tensor | None = None


class FusionGate(nn.Module):
    """config.gate (not in the paper): the learned factor tanh(g) on λ·r, g initialised to 0 so an untrained gated
    model is exactly the plain Generator. `shape` () for one scalar g, (H_G,) for one g per Generator dimension.
    Kept in fp32 whatever the models' dtype: its updates (about lr each) would round away in bf16."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | None = None):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        """tanh(g): () or (H_G,), in (-1, 1), broadcasting over (B, T, H_G)."""
        return torch.tanh(self.g)


class FlyThinker(GenerationMixin, nn.Module):
    """Generator + optional Reasoner. `reasoner=None` (or lam=0) is exactly the plain Generator (the SFT baseline).

    Args:
        generator: any `transformers` causal LM (PreTrainedModel, or a peft wrapper of one).
        reasoner: another causal LM embedding the same token ids, or None.
        config: fusion settings (λ, scope, rescaling, width handling, gate). An untrained gate (g = 0) is also
            exactly the plain Generator.
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
        self.gate: FusionGate | None = None
        if reasoner is not None:
            check_vocabularies(generator, reasoner, tokenizer, reasoner_tokenizer)
            d_r, d_g = hidden_size(reasoner), hidden_size(generator)
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
            if self.config.gate != "none":
                shape = () if self.config.gate == "scalar" else (d_g,)
                self.gate = FusionGate(shape, device=next(generator.parameters()).device)
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
            attention_mask, position_ids = hf_mask_args(attention_mask)
        base, cache_kw = self.reasoner_decoder()
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=use_cache, **{cache_kw: past_key_values})
        return out.last_hidden_state, (output_cache(out) if use_cache else None)

    def reasoner_decoder(self) -> tuple[nn.Module, str]:
        """(R's decoder stack without its LM head, `hf.base_model`; the KV-cache keyword its forward takes), looked
        up once per Reasoner object rather than on every decode step (HF's `get_decoder` walks its fallbacks each
        call). Keyed on the `reasoner` module itself: assigning another Reasoner (a LoRA wrapper) looks it up
        again; a deep copy carries its own copy of the pair; `.to()`, `place_reasoner` and loading weights change
        parameters in place and keep it valid."""
        # A tuple in __dict__: not registered as a submodule, so never in the state dict, parameters() or repr.
        cached = self.__dict__.get("_reasoner_decoder")
        if cached is not None and cached[0] is self.reasoner:
            return cached[1], cached[2]
        base = base_model(self.reasoner)
        (cache_kw,) = cache_kwargs(base, None)
        self.__dict__["_reasoner_decoder"] = (self.reasoner, base, cache_kw)
        return base, cache_kw

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
        """Mean L2 norm of the Generator's input embeddings as the Generator sees them (scalar, detached: a target
        scale, not a path for gradients). One vocabulary-wide constant, so teacher forcing and incremental decoding
        rescale identically. Embedding layers that scale their output (Gemma's multiplies rows by sqrt(hidden size),
        `embed_scale`) count that scale: e(x_i) is the scaled row, so the norm r is rescaled to must be too."""
        emb = self.generator.get_input_embeddings()
        with whole_params(emb.weight):  # partitioned under ZeRO-3: its slice alone would give a norm of 0
            norm = emb.weight.detach().float().norm(dim=-1).mean()
        scale = getattr(emb, "embed_scale", None)
        if scale is not None:
            norm = norm * torch.as_tensor(scale).detach().float().abs().to(norm.device)
        return norm

    def fuse(self, token_embeds: torch.Tensor, prev_states: torch.Tensor, mask: torch.Tensor,
             emb_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 6: e(x_i) + λ · rescale(proj(r_{i-1})) at the masked positions; with config.gate,
        e(x_i) + tanh(g) ⊙ λ · rescale(proj(r_{i-1})). Used by training AND decoding.

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
        if self.gate is not None:
            add = add * self.gate().to(add.device)                      # () or (H_G,) broadcast over (B, T, H_G)
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
        hf_mask, position_ids = hf_mask_args(attention_mask)
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

    # ------------------------------------------------------------------------------------------------------------
    # decoding (Algorithm 2): `generate` / `stream` come from GenerationMixin and run these

    def decode_lms(self) -> list[tuple[str, nn.Module]]:
        """The models a decode runs, the Generator first."""
        return [("Generator", self.generator)] + ([("Reasoner", self.reasoner)] if self.fusion_enabled else [])

    def decoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig):
        """The per-decode state: R and G stepping together with their own KV caches, or G alone without fusion."""
        if not self.fusion_enabled:
            from ...decoding.loop import CausalLMStepper

            return CausalLMStepper(self.generator, input_ids, attention_mask, cfg)
        return FlyThinkerStepper(self, input_ids, attention_mask, cfg)

    # ------------------------------------------------------------------------------------------------------------
    # training hooks (called by flythinker.training.loop.fit)

    def trainable_parts(self) -> list[tuple[str, nn.Module]]:
        """(name, module) pairs that get their own optimizer groups (learning rates `lr_<name>`)."""
        return [(n, m) for n, m in (("generator", self.generator), ("reasoner", self.reasoner),
                                    ("projection", self.projection), ("gate", self.gate)) if m is not None]

    def prepare_training(self, features: Sequence[dict[str, Any]], calibration_examples: int,
                         pad_token_id: int) -> int:
        """Before the first step (and before a resume restores weights): set the Reasoner statistics that
        config.normalize needs from the first `calibration_examples` features (untrained R, one example per pass,
        no padding), so a resumed run recomputes exactly the values it started with. A no-op (returns 0) when not
        needed or already set."""
        if self.reasoner is None or self.config.normalize == "none" or self.calibrated:
            return 0
        if calibration_examples < 1:
            raise UserError("train.calibration_examples must be >= 1 when normalize is center or standardize")
        device = next(self.reasoner.parameters()).device
        batches = ((b["input_ids"].to(device), b["attention_mask"].to(device))
                   for b in (collate([f], pad_token_id, padding_side="right")
                             for f in features[:calibration_examples]))
        return self.calibrate(batches)

    # ------------------------------------------------------------------------------------------------------------
    # persistence

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        """HF-style directory: generator/, reasoner/ (if any), flythinker.json, fusion.safetensors (if projected,
        gated or calibrated),
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
                "has_projection": self.projection is not None, "has_gate": self.gate is not None,
                "calibrated": calibrated, "format_version": 1}
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        tensors = {}
        if self.projection is not None:
            tensors["projection.weight"] = self.projection.weight.detach().cpu().contiguous()
        if self.gate is not None:
            tensors["gate.g"] = self.gate.g.detach().cpu().contiguous()
        if calibrated:
            tensors.update({k: getattr(self, k).detach().cpu().contiguous() for k in ("r_mean", "r_std", "r_count")})
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(path / FUSION_WEIGHTS))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        config: FlyThinkerConfig | None = None, load_tokenizer: bool = True) -> "FlyThinker":
        """Load a directory written by `save_pretrained` (or a trainer checkpoint). `config` overrides the saved one
        (e.g. another λ at inference).

        A directory that is not whole fails with one line naming the file: FileNotFoundError for a missing
        flythinker.json, generator/, reasoner/ or fusion.safetensors; ValueError for a flythinker.json that is not
        JSON or has no `flythinker` section, and for weights that do not load (e.g. a truncated safetensors)."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        meta_file = path / CONFIG_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a FlyThinker directory (no {CONFIG_NAME})")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_file}: invalid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{meta_file}: not UTF-8 text (not a file written by FlyThinker.save_pretrained)") \
                from None
        if not isinstance(meta, dict) or not isinstance(meta.get("flythinker"), dict):
            raise ValueError(  # noqa: TRY004 -- a bad file's content, not a caller's argument type
                f"{meta_file}: no 'flythinker' section (not a file written by FlyThinker.save_pretrained)")
        try:
            cfg = config or FlyThinkerConfig.from_dict(meta["flythinker"])
        except ValueError as e:
            raise ValueError(f"{meta_file}: bad 'flythinker' section ({e})") from None
        kw = {"dtype": dtype} if dtype is not None else {}

        def lm(sub: str) -> nn.Module:
            d = path / sub
            if not d.is_dir():
                raise FileNotFoundError(f"{d}: missing ({CONFIG_NAME} records a {sub}; the directory is incomplete)")
            try:
                return AutoModelForCausalLM.from_pretrained(d, **kw)
            except Exception as e:  # noqa: BLE001 -- OSError, SafetensorError, ValueError: the files are bad
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"{d}: cannot load the model ({first})") from None

        generator = lm("generator")
        reasoner = lm("reasoner") if meta.get("has_reasoner") else None
        tokenizer = None
        if load_tokenizer and (path / "generator" / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path / "generator")
        model = cls(generator, reasoner, cfg, tokenizer=tokenizer)
        if meta.get("has_projection") and model.projection is None:
            raise ValueError(f"{path}: saved with a projection but the configured width_mode has none")
        if meta.get("has_gate") and model.gate is None:
            raise ValueError(f"{path}: saved with a fusion gate but the configured gate is 'none'")
        if meta.get("has_projection") or meta.get("has_gate") or meta.get("calibrated"):
            from safetensors.torch import load_file

            fusion_file = path / FUSION_WEIGHTS
            if not fusion_file.is_file():
                raise FileNotFoundError(f"{fusion_file}: missing ({CONFIG_NAME} records fusion weights)")
            try:
                saved = load_file(str(fusion_file))
            except Exception as e:  # noqa: BLE001 -- SafetensorError / OSError: truncated or not safetensors
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"{fusion_file}: cannot load ({first})") from None
            keys = (["projection.weight"] if meta.get("has_projection") else []) + \
                (["gate.g"] if meta.get("has_gate") else []) + \
                (["r_mean", "r_std", "r_count"] if meta.get("calibrated") else [])
            missing = [k for k in keys if k not in saved]
            if missing:
                raise ValueError(f"{fusion_file}: missing tensor(s) {', '.join(missing)}")
            with torch.no_grad():
                if meta.get("has_projection"):
                    w = saved["projection.weight"]
                    model.projection.weight.copy_(w.to(model.projection.weight.dtype))
                if meta.get("has_gate"):
                    g = saved["gate.g"]
                    if g.shape != model.gate.g.shape:
                        raise ValueError(f"{fusion_file}: gate of shape {tuple(g.shape)}, but the configured gate "
                                         f"{model.config.gate!r} has shape {tuple(model.gate.g.shape)}")
                    model.gate.g.copy_(g)
                if meta.get("calibrated"):
                    for k in ("r_mean", "r_std", "r_count"):
                        getattr(model, k).copy_(saved[k])
        return model


def _save_lm(lm: nn.Module, path: Path, safe_serialization: bool) -> None:
    if hasattr(lm, "merge_and_unload"):  # peft wrapper: save merged full weights so loading needs no peft
        lm = copy.deepcopy(lm).merge_and_unload()
    lm.save_pretrained(path, safe_serialization=safe_serialization)
