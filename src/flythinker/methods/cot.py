"""CoT: fine-tuned think-then-generate with explicit reasoning text, the baseline FlyThinker's latent reasoning is
compared against. The Generator alone learns to write a reasoning span between two delimiters, then the response.

Owns the CoT settings (`CoTConfig`), the training sequence (`CoT.features`: prompt, opening delimiter, reasoning
from a teacher (`methods.teachers`), closing delimiter, response; loss on everything after the opening
delimiter), the per-row phase machine of a decode (`RowPhases`), its KV-cached decode step (`CoTStepper`, a Stepper
of the shared loop `decoding.loop`), the model (`CoTModel`: the SFT model plus delimiters, saved with its settings)
and the registry entry (`CoT`).

Delimiters are token-id sequences, fixed once from the tokenizer: each segment of a training sequence is tokenized
on its own and the ids concatenated, so the closing delimiter the model learns to emit is always the same ids and a
decode can recognise it by id. The opening delimiter is appended to the prompt (it is prompt, not learned); the
closing one is supervised, since emitting it is how the model ends its reasoning.

Decoding runs the one loop with a budget of `max_reasoning_tokens` + closing delimiter + max_new_tokens. Each row
starts in its reasoning phase (EOS masked: a reasoning span never ends the answer), switches to its response when
its last tokens are the closing delimiter, or when it reaches `max_reasoning_tokens`, where the rest of the
delimiter is forced (one-hot logits); its response then gets the caller's whole max_new_tokens. `generate` /
`stream` return the response tokens only; the reasoning and the token counts (every generated token, forced ones
included) go to `last_generation_extras`. The stepper also runs under the plain loop alone (the decode timing
does that), where it yields every generated token.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.collate import IGNORE_INDEX
from ..data.config import DataConfig
from ..data.schema import Example
from ..decoding import loop
from ..decoding.loop import CausalLMStepper, check_inputs, special_ids
from ..decoding.sampling import DecodeConfig, decode_config
from ..hf import context_limit, device_of
from ..utils import UserError
from .base import Method, ModelArgs, setup_lms
from .configs import CoTConfig
from .flythinker.model import CONFIG_NAME, FlyThinker

COT_FORMAT = 1


def encode_delimiters(tokenizer: Any, cfg: CoTConfig) -> tuple[list[int], list[int]]:
    """(opening ids, closing ids), each delimiter tokenized on its own. A delimiter the tokenizer cannot represent
    exactly (its ids do not decode back to it) or a closing one containing EOS is a UserError naming the setting."""
    out = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for key, text in (("open_delimiter", cfg.open_delimiter), ("close_delimiter", cfg.close_delimiter)):
        ids = list(tokenizer.encode(text, add_special_tokens=False)) if text else []
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) if ids else ""
        if back != text:
            raise UserError(f"model.cot.{key} {text!r} does not round-trip through the tokenizer (decodes to "
                            f"{back!r}); choose text or special tokens it represents exactly")
        if key == "close_delimiter" and eos is not None and int(eos) in ids:
            raise UserError(f"model.cot.close_delimiter {text!r} contains the EOS token; a delimiter must not end "
                            f"the sequence")
        out.append([int(i) for i in ids])
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------
# decoding


REASONING, CLOSING, RESPONSE, DONE = "reasoning", "closing", "response", "done"


class RowPhases:
    """Where each row of a decode is: reasoning -> (closing: delimiter tokens being forced) -> response -> done.

    `observe(tokens)` takes the tokens generated at one step (B,) as ints. A reasoning row switches to its response
    when its reasoning-phase tokens end with the closing delimiter (those ids are the delimiter, not reasoning), or
    when it has `cap` of them: the part of the delimiter already begun is kept and the rest is forced. A response
    row is done at EOS (or when `finish` says so). Pure Python over ints: the stepper (to shape logits) and
    `CoTModel.stream` (to split the output) each run one over the same tokens and agree."""

    def __init__(self, batch: int, close_ids: Sequence[int], cap: int, eos_ids: Sequence[int]):
        self.close, self.cap, self.eos = list(close_ids), int(cap), {int(e) for e in eos_ids}
        if self.eos & set(self.close):
            # A forced delimiter token would end the row in the loop while it is still closing its reasoning.
            raise ValueError(f"the closing delimiter {self.close} contains a stop id of this decode "
                             f"({sorted(self.eos & set(self.close))}); pass other eos_token_id or delimiters")
        start = REASONING if cap > 0 else CLOSING
        self.phase = [start] * batch
        self.pending = [[] if cap > 0 else list(self.close) for _ in range(batch)]   # forced tokens still to come
        self.buf: list[list[int]] = [[] for _ in range(batch)]                       # reasoning-phase tokens
        self.reasoning: list[list[int] | None] = [None] * batch
        self.response: list[list[int]] = [[] for _ in range(batch)]
        self.generated = [0] * batch

    def observe(self, tokens: Sequence[int]) -> None:
        L = len(self.close)
        for r, y in enumerate(tokens):
            p = self.phase[r]
            if p == DONE:
                continue
            self.generated[r] += 1
            if p == REASONING:
                buf = self.buf[r]
                buf.append(int(y))
                if len(buf) >= L and buf[-L:] == self.close:
                    self.reasoning[r] = buf[:-L]
                    self.phase[r] = RESPONSE
                elif len(buf) >= self.cap:
                    k = next((k for k in range(min(len(buf), L - 1), 0, -1) if buf[-k:] == self.close[:k]), 0)
                    self.reasoning[r] = buf[: len(buf) - k]
                    self.pending[r] = self.close[k:]
                    self.phase[r] = CLOSING
            elif p == CLOSING:
                self.pending[r].pop(0)
                if not self.pending[r]:
                    self.phase[r] = RESPONSE
            else:
                self.response[r].append(int(y))
                if int(y) in self.eos:
                    self.phase[r] = DONE

    def finish(self, r: int) -> None:
        self.phase[r] = DONE

    def done(self, r: int) -> bool:
        return self.phase[r] == DONE

    def reasoning_ids(self, r: int) -> list[int]:
        """The row's reasoning without the delimiter (what it wrote so far when it never got to a response)."""
        return list(self.reasoning[r]) if self.reasoning[r] is not None else list(self.buf[r])

    def forced(self) -> list[tuple[int, int]]:
        """(row, token) of every row whose next token is forced."""
        return [(r, self.pending[r][0]) for r, p in enumerate(self.phase) if p == CLOSING]

    def reasoning_rows(self) -> list[int]:
        return [r for r, p in enumerate(self.phase) if p == REASONING]


class CoTStepper:
    """One CoT decode: the Generator's KV-cached step (`CausalLMStepper`) over the prompt + opening delimiter, with
    each row's next-token logits shaped by its phase: EOS masked while reasoning, one-hot on a forced delimiter
    token. Every step (forced or not) runs the model once, so timing it per step counts every generated token."""

    def __init__(self, lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig,
                 open_ids: Sequence[int], close_ids: Sequence[int], cap: int):
        dev = device_of(lm)
        ids, mask = input_ids.to(dev), attention_mask.to(dev)
        if open_ids:
            # Appended after the last column, so left padding stays left padding.
            extra = torch.tensor(list(open_ids), dtype=ids.dtype, device=dev).expand(ids.shape[0], -1)
            ids = torch.cat([ids, extra], dim=1)
            mask = torch.cat([mask, torch.ones_like(extra, dtype=mask.dtype)], dim=1)
        _check_context(lm, mask, cfg.max_new_tokens)
        self.inner = CausalLMStepper(lm, ids, mask, cfg)
        self.device = self.inner.device
        eos_ids, _ = special_ids(lm, cfg)
        self.rows = RowPhases(ids.shape[0], close_ids, cap, eos_ids)
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)

    def prefill(self) -> torch.Tensor:
        return self._shape(self.inner.prefill())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.rows.observe(tokens.tolist())
        return self._shape(self.inner.step(tokens))

    @torch.inference_mode()
    def _shape(self, logits: torch.Tensor) -> torch.Tensor:
        reasoning, forced = self.rows.reasoning_rows(), self.rows.forced()
        if not forced and not (reasoning and self.eos.numel()):
            return logits
        logits = logits.clone()
        if reasoning and self.eos.numel():
            rows = torch.tensor(reasoning, dtype=torch.long, device=logits.device)
            logits[rows[:, None], self.eos[None, :]] = float("-inf")
        for r, tok in forced:
            logits[r] = float("-inf")
            logits[r, tok] = 0.0
        return logits

    def close(self) -> None:
        self.inner.close()


def _check_context(lm: nn.Module, mask: torch.Tensor, new_tokens: int) -> None:
    limit = context_limit(lm)
    longest = int(mask.long().sum(-1).max())
    if limit is not None and longest + new_tokens > limit:
        raise ValueError(f"prompt of {longest} tokens (opening delimiter included) + {new_tokens} new tokens (CoT "
                         f"reasoning, delimiter and response) exceeds the Generator's context of {limit} positions")


# ----------------------------------------------------------------------------------------------------------------
# the model


class CoTModel(FlyThinker):
    """The Generator alone (FlyThinker without a Reasoner, trained and saved like SFT) plus CoT's delimiters and
    settings. `forward` is the plain teacher-forced pass; `generate` / `stream` return response tokens only and
    leave `last_generation_extras` = [{"reasoning_ids", "reasoning_tokens", "generated_tokens"}, ...] per row.

    Args:
        generator: any HF causal LM.
        config: CoT settings (defaults when None).
        tokenizer: encodes the delimiters (and is saved with the model).
        delimiter_ids: (opening ids, closing ids) when there is no tokenizer (a checkpoint records them).
    """

    def __init__(self, generator: nn.Module, config: CoTConfig | None = None, tokenizer: Any = None,
                 delimiter_ids: tuple[Sequence[int], Sequence[int]] | None = None):
        super().__init__(generator, None, None, tokenizer=tokenizer)
        self.cot = config or CoTConfig()
        if delimiter_ids is None:
            if tokenizer is None:
                raise ValueError("CoTModel needs a tokenizer (or delimiter_ids) to encode its delimiters")
            delimiter_ids = encode_delimiters(tokenizer, self.cot)
        self.open_ids = [int(i) for i in delimiter_ids[0]]
        self.close_ids = [int(i) for i in delimiter_ids[1]]
        if not self.close_ids:
            raise ValueError("CoTModel: the closing delimiter has no tokens")
        self.last_generation_extras: list[dict[str, Any]] | None = None

    @property
    def reasoning_budget(self) -> int:
        """The most tokens a row generates before its response: the reasoning cap plus the closing delimiter."""
        return self.cot.max_reasoning_tokens + len(self.close_ids)

    def decoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig) -> CoTStepper:
        return CoTStepper(self.generator, input_ids, attention_mask, cfg, self.open_ids, self.close_ids,
                          self.cot.max_reasoning_tokens)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """The response tokens (B, N), N <= max_new_tokens, each row padded with pad_token_id after its EOS (as
        every method's generate). kwargs: `DecodeConfig` fields; max_new_tokens bounds the response, and the
        reasoning gets `max_reasoning_tokens` on top."""
        return torch.stack(list(self.stream(input_ids, attention_mask, **kwargs)), dim=1)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, streamer: Any = None,
               **kwargs: Any) -> Iterator[torch.Tensor]:
        """Yields response column j (B,) as soon as every row has its j-th response token or has finished (rows
        reason for different lengths, so a column waits for the slowest row's switch). Bad input raises here."""
        cfg = decode_config(kwargs)
        attention_mask = check_inputs(self.decode_lms(), input_ids, attention_mask, cfg)
        budget = self.reasoning_budget + cfg.max_new_tokens
        limit = context_limit(self.generator)
        longest = int(attention_mask.long().sum(-1).max()) + len(self.open_ids)
        if limit is not None and longest + budget > limit:
            raise ValueError(f"prompt of {longest} tokens (CoT's opening delimiter included) + up to "
                             f"{self.reasoning_budget} reasoning and delimiter tokens + max_new_tokens "
                             f"{cfg.max_new_tokens} exceeds the Generator's context of {limit} positions")
        eos_ids, pad = special_ids(self.generator, cfg)
        rows = RowPhases(input_ids.shape[0], self.close_ids, self.cot.max_reasoning_tokens, eos_ids)
        inner = loop.stream(self, input_ids, attention_mask, **{**kwargs, "max_new_tokens": budget})
        return self._responses(inner, rows, input_ids, cfg.max_new_tokens, pad, streamer)

    def _responses(self, inner: Iterator[torch.Tensor], rows: RowPhases, input_ids: torch.Tensor, limit: int,
                   pad: int, streamer: Any) -> Iterator[torch.Tensor]:
        B = input_ids.shape[0]
        self.last_generation_extras = None
        emitted, device = 0, input_ids.device

        def column(final: bool) -> list[int] | None:
            lens = [len(r) for r in rows.response]
            if emitted >= limit or not any(n > emitted for n in lens):
                return None
            if not final and not all(n > emitted or rows.done(r) for r, n in enumerate(lens)):
                return None
            return [rows.response[r][emitted] if n > emitted else pad for r, n in enumerate(lens)]

        try:
            if streamer is not None:
                streamer.put(input_ids.detach().cpu())
            for col in inner:
                device = col.device
                rows.observe(col.tolist())
                for r in range(B):
                    if len(rows.response[r]) >= limit:
                        rows.finish(r)           # its response budget is spent; later tokens are not its output
                while (c := column(final=False)) is not None:
                    out = torch.tensor(c, dtype=torch.long, device=device)
                    if streamer is not None:
                        streamer.put(out.cpu())
                    emitted += 1
                    yield out
                if all(rows.done(r) for r in range(B)):
                    break
            while (c := column(final=True)) is not None:
                out = torch.tensor(c, dtype=torch.long, device=device)
                if streamer is not None:
                    streamer.put(out.cpu())
                emitted += 1
                yield out
        finally:
            inner.close()  # stops the loop early (all rows done) and runs its clean-up: stepper, train mode
            if streamer is not None:
                streamer.end()
            self.last_generation_extras = [
                {"reasoning_ids": rows.reasoning_ids(r), "reasoning_tokens": len(rows.reasoning_ids(r)),
                 "generated_tokens": rows.generated[r]} for r in range(B)]

    # ------------------------------------------------------------------------------------------------------------
    # persistence: the SFT layout, plus a "cot" section in flythinker.json (so checkpoint fingerprints cover it)

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        from ..safeio import atomic_write_text

        super().save_pretrained(path, safe_serialization)
        meta_file = Path(path) / CONFIG_NAME
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        meta["method"] = "cot"
        meta["cot"] = {"config": self.cot.to_dict(), "open_ids": self.open_ids, "close_ids": self.close_ids,
                       "format_version": COT_FORMAT}
        atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, config: CoTConfig | None = None,
                        load_tokenizer: bool = True) -> CoTModel:
        """A directory written by `save_pretrained`. `config` overrides the saved settings (e.g. another reasoning
        cap at inference); other delimiters than the saved ones need the saved tokenizer to encode them."""
        path = Path(path)
        base = FlyThinker.from_pretrained(path, dtype=dtype, load_tokenizer=load_tokenizer)
        meta = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        section = meta.get("cot")
        if not isinstance(section, dict) or not isinstance(section.get("config"), dict):
            raise ValueError(  # noqa: TRY004 -- a bad file's content, not a caller's argument type
                f"{path / CONFIG_NAME}: no 'cot' section (not a CoT model; load it with its own method)")
        if base.reasoner is not None:
            raise ValueError(f"{path}: a CoT model has no Reasoner, but this checkpoint has one")
        try:
            saved = CoTConfig.from_dict(section["config"])
        except ValueError as e:
            raise ValueError(f"{path / CONFIG_NAME}: bad 'cot' section ({e})") from None
        cfg = config or saved
        ids = None
        if (cfg.open_delimiter, cfg.close_delimiter) == (saved.open_delimiter, saved.close_delimiter):
            ids = (section.get("open_ids", []), section.get("close_ids", []))
            if not all(isinstance(x, list) and all(isinstance(i, int) for i in x) for x in ids):
                raise ValueError(f"{path / CONFIG_NAME}: bad 'cot' delimiter ids")
        elif base.tokenizer is None:
            raise ValueError("other delimiters than the saved ones need the checkpoint's tokenizer to encode them")
        return cls(base.generator, cfg, tokenizer=base.tokenizer, delimiter_ids=ids)


# ----------------------------------------------------------------------------------------------------------------
# the registry entry


class CoT(Method):
    name = "cot"
    display = "CoT"
    trained = True
    uses_reasoner = False
    description = "the Generator fine-tuned to write a reasoning text (from a teacher), then the response"

    def __init__(self, config: CoTConfig | None = None):
        self.config = config
        """Settings used when the model settings carry none (`ModelArgs` without a `cot` section)."""

    def cot_config(self, args: ModelArgs | None = None) -> CoTConfig:
        """`args.cot` when the model settings have it, else this entry's own settings, else the defaults."""
        cfg = getattr(args, "cot", None)
        return cfg if isinstance(cfg, CoTConfig) else self.config or CoTConfig()

    def model_args(self, args: ModelArgs) -> ModelArgs:
        return dataclasses.replace(args, method="cot")

    def from_lms(self, generator: nn.Module, reasoner: nn.Module | None, args: ModelArgs,
                 tokenizer: Any = None) -> nn.Module:
        """The Generator alone (a given Reasoner is ignored), set up per `args` (LoRA, freezing, ...)."""
        if tokenizer is None:
            raise UserError("CoT needs the Generator's tokenizer (to encode its delimiters)")
        generator, _ = setup_lms(generator, None, args)
        return CoTModel(generator, self.cot_config(args), tokenizer=tokenizer)

    def load(self, path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
        return CoTModel.from_pretrained(path, dtype=dtype)

    def features(self, examples: Sequence[Example], tokenizer: Any, data: DataConfig,
                 args: ModelArgs | None = None, data_path: str | Path | None = None,
                 store: Any = None) -> list[dict[str, Any]]:
        """{"input_ids", "labels"} per example: prompt + opening delimiter (unsupervised), then the teacher's
        reasoning cut to `max_reasoning_tokens` (at a sentence boundary) + closing delimiter + response ending in
        EOS (supervised). Teacher texts come from the cache next to `data_path` (or `teacher.cache`) when there.
        `args` (the model settings) gives the CoT section and the self teacher's model when passed."""
        from ..data.collate import encode_example
        from ..data.truncate import truncate_to_tokens
        from .teachers import cache_path, make_teacher, teacher_inputs, teacher_texts

        cfg = self.cot_config(args)
        open_ids, close_ids = encode_delimiters(tokenizer, cfg)
        teacher = make_teacher(cfg.teacher, generator=getattr(args, "generator", None) or "default")
        texts = teacher_texts(teacher, teacher_inputs(examples, tokenizer, data, store=store),
                              cache_path(cfg.teacher, data_path))
        feats = []
        for ex, text in zip(examples, texts, strict=True):
            enc = encode_example(ex, tokenizer, data, with_response=True, store=store)
            reasoning = truncate_to_tokens(text.strip(), tokenizer, cfg.max_reasoning_tokens)
            r_ids = list(tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else []
            head = enc["prompt_ids"] + open_ids
            tail = r_ids + close_ids + enc["response_ids"]
            feats.append({"input_ids": head + tail, "labels": [IGNORE_INDEX] * len(head) + tail})
        return feats


__all__ = ["CoT", "CoTConfig", "CoTModel", "CoTStepper", "RowPhases", "encode_delimiters"]
