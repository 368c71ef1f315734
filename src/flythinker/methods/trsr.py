"""LLM-TRSR, summary-enhanced training (Zheng et al., WWW 2024, "Harnessing Large Language Models for Text-Rich
Sequential Recommendation"), as the FlyThinker paper runs it: the user's history is summarised, the summary goes
into the prompt, and the Generator is fine-tuned (SFT) on that prompt.

    user message:  <header> <summary of the history>  +  <history block>  +  <query>       (`summary_message`)

Owns the TRSR prompt (`summary_prompts`: one function, so training and decoding see the same prompt ids), the
model (`TRSRModel`: the SFT model plus its summary settings, saved with them, building its own prompts for the
`inference.Predictor` through `encode_prompts`) and the registry entry (`TRSR`).

The summary comes from the same pluggable teachers as CoT's reasoning (`methods.teachers`: the offline extractive
feature summary by default, the base Generator prompted (`self`) or an OpenAI-compatible endpoint), asked with
`SUMMARY_INSTRUCTION` and cached (next to the training data when its path is known, else in `teacher.cache` or the
flythinker cache; a prediction run looks the summaries of its own examples up there, or computes them).
What differs from the original: LLM-TRSR summarises a user's whole behaviour sequence hierarchically or
recurrently with an LLM; here one teacher call reads the `summary_k` best items under the data's retrieval.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.config import DataConfig
from ..data.schema import Example
from .base import Method, ModelArgs, setup_lms
from .configs import TRSRConfig
from .flythinker.model import CONFIG_NAME, FlyThinker

TRSR_FORMAT = 1

SUMMARY_INSTRUCTION = (
    "Summarise this user's past texts shown above in 2 to 4 plain sentences: what they write about, what they "
    "like and dislike, and how they write (length, tone, recurring phrases). Do not write the requested text itself."
)
"""What the model teachers (`self`, `endpoint`) are asked for LLM-TRSR's summary."""


def summary_message(summary: str, user: str, cfg: TRSRConfig) -> str:
    """The user turn with the summary block first: header line, summary, blank line, then the usual message
    (history block and query). An empty summary leaves the message unchanged."""
    if not summary:
        return user
    head = f"{cfg.header}\n" if cfg.header else ""
    return f"{head}{summary}\n\n{user}"


def summary_texts(examples: Sequence[Example], tokenizer: Any, data: DataConfig, cfg: TRSRConfig,
                  generator: str = "default", data_path: str | Path | None = None, store: Any = None) -> list[str]:
    """One summary per example from `cfg.teacher` (cached), whitespace-collapsed and cut to `summary_tokens` at a
    sentence boundary. The teacher reads the `summary_k` best history items (0: the prompt's k) and the query,
    never the reference response."""
    from ..data.truncate import truncate_to_tokens
    from .teachers import cache_path, make_teacher, teacher_inputs, teacher_texts

    teacher = make_teacher(cfg.teacher, generator=generator, instruction=SUMMARY_INSTRUCTION)
    read = dataclasses.replace(data, k=cfg.summary_k) if cfg.summary_k > 0 else data
    texts = teacher_texts(teacher, teacher_inputs(examples, tokenizer, read, store=store),
                          cache_path(cfg.teacher, data_path))
    return [truncate_to_tokens(" ".join(t.split()), tokenizer, cfg.summary_tokens) for t in texts]


def summary_prompts(examples: Sequence[Example], tokenizer: Any, data: DataConfig, cfg: TRSRConfig,
                    generator: str = "default", data_path: str | Path | None = None,
                    store: Any = None) -> list[list[int]]:
    """The TRSR prompt ids of each example (what training conditions on and decoding starts from)."""
    from ..data.collate import encode_prompt
    from ..data.prompts import format_prompt, user_message

    summaries = summary_texts(examples, tokenizer, data, cfg, generator, data_path, store)
    return [encode_prompt(format_prompt(summary_message(s, user_message(ex, tokenizer, data, store=store), cfg),
                                        tokenizer, data), tokenizer, data)
            for ex, s in zip(examples, summaries, strict=True)]


class TRSRModel(FlyThinker):
    """The Generator alone (FlyThinker without a Reasoner, trained and saved like SFT) plus LLM-TRSR's summary
    settings. `forward`, `generate` and `stream` are SFT's; `encode_prompts` puts the summary in the prompt.

    Args:
        generator: any HF causal LM.
        config: TRSR settings (defaults when None).
        tokenizer: saved with the model.
        teacher_generator: the base model the `self` teacher summarises with (recorded, so predictions made from a
            checkpoint ask the same model as training did).
    """

    def __init__(self, generator: nn.Module, config: TRSRConfig | None = None, tokenizer: Any = None,
                 teacher_generator: str = "default"):
        super().__init__(generator, None, None, tokenizer=tokenizer)
        self.trsr = config or TRSRConfig()
        self.teacher_generator = teacher_generator

    def encode_prompts(self, examples: Sequence[Example], tokenizer: Any, data: DataConfig,
                       store: Any = None) -> dict[str, torch.Tensor]:
        """Left-padded TRSR prompts: {"input_ids", "attention_mask"} (B, T) LongTensors."""
        from ..data.collate import collate, pad_token_id

        ids = summary_prompts(examples, tokenizer, data, self.trsr, self.teacher_generator, store=store)
        enc = collate([{"prompt_ids": p} for p in ids], pad_token_id(tokenizer), padding_side="left")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        from ..safeio import atomic_write_text

        super().save_pretrained(path, safe_serialization)
        meta_file = Path(path) / CONFIG_NAME
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        meta["method"] = "trsr"
        meta["trsr"] = {"config": self.trsr.to_dict(), "teacher_generator": self.teacher_generator,
                        "format_version": TRSR_FORMAT}
        atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, config: TRSRConfig | None = None,
                        load_tokenizer: bool = True) -> TRSRModel:
        """A directory written by `save_pretrained`; `config` overrides the saved settings."""
        path = Path(path)
        base = FlyThinker.from_pretrained(path, dtype=dtype, load_tokenizer=load_tokenizer)
        section = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get("trsr")
        if not isinstance(section, dict) or not isinstance(section.get("config"), dict):
            raise ValueError(  # noqa: TRY004 -- a bad file's content, not a caller's argument type
                f"{path / CONFIG_NAME}: no 'trsr' section (not an LLM-TRSR model; load it with its own method)")
        if base.reasoner is not None:
            raise ValueError(f"{path}: an LLM-TRSR model has no Reasoner, but this checkpoint has one")
        try:
            saved = TRSRConfig.from_dict(section["config"])
        except ValueError as e:
            raise ValueError(f"{path / CONFIG_NAME}: bad 'trsr' section ({e})") from None
        return cls(base.generator, config or saved, tokenizer=base.tokenizer,
                   teacher_generator=str(section.get("teacher_generator") or "default"))


class TRSR(Method):
    name = "trsr"
    display = "LLM-TRSR"
    trained = True
    description = "the Generator fine-tuned with a summary of the user's history (from a teacher) in the prompt"

    def __init__(self, config: TRSRConfig | None = None):
        self.config = config
        """Settings used when the model settings carry none."""

    def trsr_config(self, args: ModelArgs | None = None) -> TRSRConfig:
        """`args.trsr` when the model settings have it, else this entry's own settings, else the defaults."""
        cfg = getattr(args, "trsr", None)
        return cfg if isinstance(cfg, TRSRConfig) else self.config or TRSRConfig()

    def model_args(self, args: ModelArgs) -> ModelArgs:
        return dataclasses.replace(args, method="trsr")

    def from_lms(self, generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs,
                 tokenizer: Any = None) -> nn.Module:
        """The Generator alone (a given Reasoner is ignored), set up per `args` (LoRA, freezing, ...)."""
        generator, _ = setup_lms(generator, None, args)
        return TRSRModel(generator, self.trsr_config(args), tokenizer=tokenizer,
                         teacher_generator=getattr(args, "generator", None) or "default")

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        return TRSRModel.from_pretrained(path, dtype=dtype)

    def features(self, examples: Sequence[Example], tokenizer: Any, data: DataConfig,
                 args: ModelArgs | None = None, data_path: str | Path | None = None,
                 store: Any = None) -> list[dict[str, Any]]:
        """{"prompt_ids", "response_ids"} per example: the TRSR prompt (`summary_prompts`) and the response ending
        in EOS, supervised as SFT's. Summaries come from the cache next to `data_path` (or `teacher.cache`)."""
        from ..data.collate import encode_example

        cfg = self.trsr_config(args)
        prompts = summary_prompts(examples, tokenizer, data, cfg, getattr(args, "generator", None) or "default",
                                  data_path, store)
        return [{"prompt_ids": p, "response_ids": encode_example(ex, tokenizer, data, store=store)["response_ids"]}
                for ex, p in zip(examples, prompts, strict=True)]


__all__ = ["SUMMARY_INSTRUCTION", "TRSR", "TRSRModel", "summary_message", "summary_prompts", "summary_texts"]
