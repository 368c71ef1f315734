"""NextQuill, causal preference modelling (Zhao et al., 2025, arXiv 2506.02368, "NextQuill: Causal Preference
Modeling for Enhancing LLM Personalization"): SFT of the Generator whose loss looks at what the user's history
changes. Each training step runs the Generator on the response twice, with the history in the prompt (z_h) and
without it (z_0), and

    δ_t  = p_h(y_t) - p_0(y_t)                        data-side effect of the history on token y_t (no gradient)
    w_t  = high if δ_t > threshold else low, rescaled to mean 1 over each response        (`token_weights`)
    loss = Σ_t w_t · -log p_h(y_t)  +  α · Σ_t -log softmax(z_h - z_0)(y_t)             (`nextquill_loss`)

so the fit focuses on preference-bearing tokens and the auxiliary term fits the model-side causal effect (the
logit difference the history makes) to the observed token.

Owns the training row layout (`NextQuill.features`, `split_packed`), the weight rule and the loss (one function
each, with shapes), the model (`NextQuillModel`: the SFT model with that forward; decoding, saving and loading are
SFT's plus a "nextquill" section) and the registry entry (`NextQuill`).

Which model estimates δ_t: the current model, from the two passes the auxiliary term already runs, detached. That
costs nothing beyond those passes and needs no second (frozen) model in memory; it is what the released code does
(`juntaoyou/NextQuill`, train.py), except that there the weights are not detached, which lets a step lower its
loss by moving weight rather than by fitting tokens. The consequence: weights follow the model as it trains.

What is and is not the original: the weight rule (0.9 / 0.1 around a 0.05 gap in the target's probability) and
the auxiliary term (α = 0.1, cross-entropy of the logit difference) are the released code's; there they are two
alternative training modes, here they are combined as the paper describes (set high = low for the auxiliary term
alone, α = 0 for the weighting alone, both for plain SFT). Weights are normalised per response (the released
code normalises per batch of one example), so the loss scale is SFT's: with uniform weights and α = 0 the loss is
exactly SFT's NLL. The paper's exact estimator of the data-side effect (it may use a separate reference model) is
not reproduced.

Training rows: the trainer hands a model (input_ids, attention_mask, labels) only, so each feature packs both
sequences into one row, [prompt with history, response, prompt without history, response], with labels on the
first response alone (the trainer's token count is SFT's). The forward splits the row back (`split_packed`). A
plain forward over the packed row (eval mode: `validate`'s dev NLL) is exactly SFT's NLL, since the first half
never attends to the second.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.collate import IGNORE_INDEX
from ..data.config import DataConfig
from ..data.schema import Example
from ..hf import hf_mask_args
from .base import Method, ModelArgs, setup_lms
from .configs import NextQuillConfig
from .flythinker.model import CONFIG_NAME, FlyThinker, FlyThinkerOutput

NEXTQUILL_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------------
# the training row


@dataclass
class PackedRows:
    """A packed training batch split back into its two sequences (see the module doc), right-padded.

    ids_h / mask_h: (B, T_h) prompt with history + response; ids_0 / mask_0: (B, T_0) prompt without + response;
    start_h / start_0: (B,) the position whose logits predict the first response token in each; n: (B,) response
    lengths."""

    ids_h: torch.Tensor
    mask_h: torch.Tensor
    ids_0: torch.Tensor
    mask_0: torch.Tensor
    start_h: torch.Tensor
    start_0: torch.Tensor
    n: torch.Tensor


def split_packed(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> PackedRows:
    """Split right-padded packed rows [P_h, R, P_0, R] (labels on the first R only) into the two sequences.
    A row that is not so packed (no labels, left padding, a second half that does not end with the response) is a
    ValueError: NextQuill trains on `NextQuill.features`, not SFT's."""
    T = input_ids.shape[1]
    m = attention_mask.long()
    if (m[:, 1:] > m[:, :-1]).any():
        raise ValueError("NextQuill training rows must be right-padded")
    L = m.sum(-1)                                                                   # (B,) row lengths
    sup = (labels != IGNORE_INDEX) & m.bool()                                       # (B, T)
    n = sup.long().sum(-1)                                                          # (B,) response lengths
    if (n == 0).any():
        raise ValueError("a NextQuill training row has no supervised tokens (rows come from NextQuill.features)")
    pos = torch.arange(T, device=input_ids.device)
    end = torch.where(sup, pos, torch.full_like(pos, -1)).amax(-1)                  # (B,) last response position
    len_h = end + 1                                                                 # (B,) first sequence's length
    len_0 = L - len_h                                                               # (B,) second sequence's length
    span = (pos >= len_h[:, None] - n[:, None]) & (pos < len_h[:, None])            # (B, T) where R must be
    if (len_h <= n).any() or (len_0 <= n).any() or (span != sup).any():
        raise ValueError("not a NextQuill training row: expected [prompt with history, response, prompt without "
                         "history, response] with labels on the first response only (NextQuill.features)")
    T_h, T_0 = int(len_h.max()), int(len_0.max())
    ar_h, ar_0 = torch.arange(T_h, device=pos.device), torch.arange(T_0, device=pos.device)
    ids_h, mask_h = input_ids[:, :T_h], (ar_h[None] < len_h[:, None]).to(attention_mask.dtype)
    idx = (len_h[:, None] + ar_0[None]).clamp(max=T - 1)                            # (B, T_0)
    ids_0, mask_0 = input_ids.gather(1, idx), (ar_0[None] < len_0[:, None]).to(attention_mask.dtype)
    start_h, start_0 = len_h - n - 1, len_0 - n - 1
    resp_h = _take(ids_h, start_h + 1, n, int(n.max()))
    resp_0 = _take(ids_0, start_0 + 1, n, int(n.max()))
    valid = torch.arange(int(n.max()), device=pos.device)[None] < n[:, None]
    if (resp_h != resp_0)[valid].any():
        raise ValueError("not a NextQuill training row: the two halves end with different responses")
    return PackedRows(ids_h, mask_h, ids_0, mask_0, start_h, start_0, n)


def _take(x: torch.Tensor, start: torch.Tensor, n: torch.Tensor, N: int) -> torch.Tensor:
    """x[b, start_b : start_b + N] for each row b, (B, N, ...) (positions past a row's n clamp to its last)."""
    idx = start[:, None] + torch.arange(N, device=x.device)[None]                   # (B, N)
    idx = torch.minimum(idx, (start + n - 1)[:, None]).clamp(min=0, max=x.shape[1] - 1)
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------------------------
# the equations


def token_weights(lp_h: torch.Tensor, lp_0: torch.Tensor, mask: torch.Tensor, cfg: NextQuillConfig) -> torch.Tensor:
    """NextQuill's per-token weights from the data-side effect δ_t = p_h(y_t) - p_0(y_t).

    Args:
        lp_h: (B, N) log p(y_t | history, query, y_<t) of each response token.
        lp_0: (B, N) log p(y_t | query, y_<t), the same tokens without the history.
        mask: (B, N) 1 on response tokens (rows are padded to N).
        cfg: threshold, high, low.
    Returns (B, N) weights, 0 off the response, each row rescaled so its weights average 1 over its n tokens
    (Σ_t w_t = n, the loss scale of SFT); a row whose raw weights are all 0 (low = 0 and no preference-bearing
    token) gets uniform weights, so it still trains as SFT. No gradient flows through them."""
    m = mask.to(lp_h.dtype)
    delta = (lp_h.exp() - lp_0.exp()).detach()                                      # (B, N) data-side effect
    raw = torch.where(delta > cfg.threshold, cfg.high, cfg.low).to(lp_h.dtype) * m  # (B, N)
    total = raw.sum(-1, keepdim=True)                                               # (B, 1)
    raw = torch.where(total > 0, raw, m)                                            # all-zero row -> uniform
    return raw * m.sum(-1, keepdim=True) / raw.sum(-1, keepdim=True).clamp_min(1e-12)


def nextquill_loss(z_h: torch.Tensor, z_0: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                   cfg: NextQuillConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The summed NextQuill loss of a batch of responses.

    Args:
        z_h: (B, N, V) logits predicting each response token with the history in the prompt.
        z_0: (B, N, V) the same without the history.
        y: (B, N) response tokens; mask: (B, N) 1 on real ones.
        cfg: the weight rule and α.
    Returns (Σ_t w_t·nll_t + α·Σ_t ce_t (scalar fp32), Σ_t nll_t (scalar, the plain NLL), weights (B, N))."""
    lp_h = F.log_softmax(z_h.float(), dim=-1)                                       # (B, N, V)
    lp_0 = F.log_softmax(z_0.float(), dim=-1)                                       # (B, N, V)
    nll_h = -lp_h.gather(-1, y[..., None])[..., 0]                                  # (B, N)
    lp0_y = lp_0.gather(-1, y[..., None])[..., 0]                                   # (B, N)
    m = mask.to(nll_h.dtype)
    w = token_weights(-nll_h, lp0_y, mask, cfg)                                     # (B, N), detached
    loss = (w * nll_h).sum()
    if cfg.alpha:
        # Model-side causal effect: the logit difference the history makes, fitted to the observed token.
        ce = -F.log_softmax(z_h.float() - z_0.float(), dim=-1).gather(-1, y[..., None])[..., 0]   # (B, N)
        loss = loss + cfg.alpha * (ce * m).sum()
    return loss, (nll_h * m).sum(), w


# ----------------------------------------------------------------------------------------------------------------
# the model


class NextQuillModel(FlyThinker):
    """The Generator alone (FlyThinker without a Reasoner: decoded, saved and loaded like SFT) trained with the
    NextQuill loss. In training mode `forward` takes packed rows (see the module doc) and returns the NextQuill
    loss as `loss_sum` over the response tokens; in eval mode, or without labels, it is SFT's forward (the dev NLL
    of the with-history response).

    Args:
        generator: any HF causal LM.
        config: NextQuill settings (defaults when None).
        tokenizer: saved with the model.
    """

    def __init__(self, generator: nn.Module, config: NextQuillConfig | None = None, tokenizer: Any = None):
        super().__init__(generator, None, None, tokenizer=tokenizer)
        self.nextquill = config or NextQuillConfig()

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hf_mask, position_ids = hf_mask_args(mask)
        return self.generator(input_ids=ids, attention_mask=hf_mask, position_ids=position_ids).logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, response_mask: torch.Tensor | None = None) -> FlyThinkerOutput:
        """input_ids / attention_mask / labels: (B, T) packed rows, right-padded. Returns loss_sum (the NextQuill
        loss, summed), n_tokens (response tokens), loss (loss_sum / n_tokens) and logits (B, N, V) with history."""
        if not self.training or labels is None:
            return super().forward(input_ids, attention_mask, labels, response_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = split_packed(input_ids, attention_mask, labels)
        N = int(rows.n.max())
        z_h = _take(self._logits(rows.ids_h, rows.mask_h), rows.start_h, rows.n, N)   # (B, N, V)
        z_0 = _take(self._logits(rows.ids_0, rows.mask_0), rows.start_0, rows.n, N)   # (B, N, V)
        y = _take(rows.ids_h, rows.start_h + 1, rows.n, N)                            # (B, N)
        mask = torch.arange(N, device=y.device)[None] < rows.n[:, None]               # (B, N)
        loss_sum, _, _ = nextquill_loss(z_h, z_0, y, mask, self.nextquill)
        n_tokens = rows.n.sum()
        return FlyThinkerOutput(loss=loss_sum / n_tokens.clamp_min(1), logits=z_h, loss_sum=loss_sum,
                                n_tokens=n_tokens)

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        from ..safeio import atomic_write_text

        super().save_pretrained(path, safe_serialization)
        meta_file = Path(path) / CONFIG_NAME
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        meta["method"] = "nextquill"
        meta["nextquill"] = {"config": self.nextquill.to_dict(), "format_version": NEXTQUILL_FORMAT}
        atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        config: NextQuillConfig | None = None, load_tokenizer: bool = True) -> NextQuillModel:
        """A directory written by `save_pretrained`; `config` overrides the saved settings."""
        path = Path(path)
        base = FlyThinker.from_pretrained(path, dtype=dtype, load_tokenizer=load_tokenizer)
        section = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get("nextquill")
        if not isinstance(section, dict) or not isinstance(section.get("config"), dict):
            raise ValueError(  # noqa: TRY004 -- a bad file's content, not a caller's argument type
                f"{path / CONFIG_NAME}: no 'nextquill' section (not a NextQuill model; load it with its own method)")
        if base.reasoner is not None:
            raise ValueError(f"{path}: a NextQuill model has no Reasoner, but this checkpoint has one")
        try:
            saved = NextQuillConfig.from_dict(section["config"])
        except ValueError as e:
            raise ValueError(f"{path / CONFIG_NAME}: bad 'nextquill' section ({e})") from None
        return cls(base.generator, config or saved, tokenizer=base.tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# the registry entry


class NextQuill(Method):
    name = "nextquill"
    display = "NextQuill"
    trained = True
    description = "the Generator fine-tuned with response tokens weighted by how much the history changes them"

    def __init__(self, config: NextQuillConfig | None = None):
        self.config = config
        """Settings used when the model settings carry none."""

    def nextquill_config(self, args: ModelArgs | None = None) -> NextQuillConfig:
        cfg = getattr(args, "nextquill", None)
        return cfg if isinstance(cfg, NextQuillConfig) else self.config or NextQuillConfig()

    def model_args(self, args: ModelArgs) -> ModelArgs:
        return dataclasses.replace(args, method="nextquill")

    def from_lms(self, generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs,
                 tokenizer: Any = None) -> nn.Module:
        """The Generator alone (a given Reasoner is ignored), set up per `args` (LoRA, freezing, ...)."""
        generator, _ = setup_lms(generator, None, args)
        return NextQuillModel(generator, self.nextquill_config(args), tokenizer=tokenizer)

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        return NextQuillModel.from_pretrained(path, dtype=dtype)

    def features(self, examples: Sequence[Example], tokenizer: Any, data: DataConfig,
                 args: ModelArgs | None = None, data_path: str | Path | None = None,
                 store: Any = None) -> list[dict[str, Any]]:
        """{"input_ids", "labels"} per example, packed: prompt with history (`data`), response + EOS, prompt
        without history (retrieval "none"), the same response; labels on the first response only."""
        from ..data.collate import encode_example

        plain = dataclasses.replace(data, retrieval="none", k=0)
        feats = []
        for ex in examples:
            with_h = encode_example(ex, tokenizer, data, with_response=True, store=store)
            p_0 = encode_example(ex, tokenizer, plain, with_response=False, store=store)["prompt_ids"]
            p_h, r = with_h["prompt_ids"], with_h["response_ids"]
            feats.append({"input_ids": p_h + r + p_0 + r,
                          "labels": [IGNORE_INDEX] * len(p_h) + r + [IGNORE_INDEX] * (len(p_0) + len(r))})
        return feats


__all__ = ["NextQuill", "NextQuillModel", "PackedRows", "nextquill_loss", "split_packed", "token_weights"]
