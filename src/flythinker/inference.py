"""Inference from a saved or in-memory model: the `Predictor` that the generate verb, the experiments and the
server share. It builds each example's prompt with the data layer, decodes with the model's `generate` / `stream`
under one `DecodeConfig`, and turns new tokens into text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .decoding.sampling import DecodeConfig
from .predictions import PredictBatchFn
from .utils import UserError


def decode_new_tokens(row: Sequence[int], tokenizer: Any, eos_ids: Sequence[int]) -> str:
    """Text of one generated row: tokens before the first EOS, special tokens skipped, stripped."""
    ids = [int(t) for t in row]
    for k, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[:k]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


class Predictor:
    """A model, its tokenizer, the prompt settings and the decode settings.

    Chunk seeding: `batch_fn(all_ids)` seeds the batch that starts at position k * batch_size of `all_ids` with
    `decode.seed + k` (0 + k when the seed is None), so a resumed prediction file is the same as an uninterrupted
    one."""

    def __init__(self, model: Any, tokenizer: Any, data_cfg: Any, decode: DecodeConfig | None = None,
                 store: Any = None):
        from .data import pad_token_id

        self.model, self.tokenizer, self.data_cfg = model, tokenizer, data_cfg
        self.store = store  # a ProfileStore for the users' histories (None: each example's inline profile)
        self.decode = decode or DecodeConfig()
        self.pad = pad_token_id(tokenizer)
        eos = tokenizer.eos_token_id
        self.eos_ids = [int(eos)] if eos is not None else []
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, data_cfg: Any = None, decode: DecodeConfig | None = None,
                        dtype: str = "auto") -> "Predictor":
        """Load `ckpt` (see `load_checkpoint`); prompt settings default to the checkpoint's training ones."""
        from .config import from_dict
        from .data import DataConfig

        model, tok = load_checkpoint(ckpt, dtype)
        if data_cfg is None:
            data_cfg = from_dict(DataConfig, dict(checkpoint_train_config(Path(ckpt)).get("data") or {}),
                                 where=f"{ckpt}/train_config.json data")
        return cls(model, tok, data_cfg, decode)

    def _kwargs(self, seed: int | None) -> dict[str, Any]:
        d = self.decode
        return dict(max_new_tokens=d.max_new_tokens, do_sample=d.do_sample, temperature=d.temperature,
                    top_p=d.top_p, top_k=d.top_k, seed=seed, eos_token_id=self.eos_ids or None,
                    pad_token_id=self.pad, concurrent=d.concurrent, cpu_threads=d.cpu_threads)

    def encode(self, batch: Sequence[Any]) -> dict[str, Any]:
        from .data import collate, encode_example

        feats = [encode_example(ex, self.tokenizer, self.data_cfg, with_response=False, store=self.store)
                 for ex in batch]
        enc = collate(feats, self.pad, padding_side="left")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def predict(self, batch: Sequence[Any], seed: int | None = None) -> list[str]:
        """One prediction string per example, in order (one left-padded generate call)."""
        import torch

        enc = self.encode(batch)
        with torch.no_grad():
            out = self.model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **self._kwargs(seed))
        return [decode_new_tokens(row, self.tokenizer, self.eos_ids) for row in out.tolist()]

    def stream(self, example: Any, seed: int | None = None) -> Iterator[str]:
        """The prediction of one example as text pieces, each yielded as soon as its tokens are decoded (a piece
        can hold several tokens when a character spans them)."""
        enc = self.encode([example])
        ids: list[int] = []
        text = ""
        for col in self.model.stream(enc["input_ids"], attention_mask=enc["attention_mask"], **self._kwargs(seed)):
            t = int(col[0])
            if t in self.eos_ids:
                break
            ids.append(t)
            new = self.tokenizer.decode(ids, skip_special_tokens=True)
            if new.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
                continue
            if len(new) > len(text):
                yield new[len(text):]
                text = new

    def batch_fn(self, all_ids: Sequence[str] | None = None) -> PredictBatchFn:
        """A `predict_batch_fn` for `generate_predictions`, seeding chunk k with seed + k (see the class doc)."""
        position = {str(i): k for k, i in enumerate(all_ids or [])}
        base = self.decode.seed or 0
        bs = self.decode.batch_size

        def predict(batch: list[Any]) -> list[str]:
            first = batch[0].get("id") if isinstance(batch[0], dict) else getattr(batch[0], "id", None)
            chunk = position.get(str(first), 0) // bs
            return self.predict(batch, seed=base + chunk)

        return predict


def model_predict_fn(model: Any, tokenizer: Any, data_cfg: Any, decode: DecodeConfig,
                     all_ids: Sequence[str] | None = None) -> PredictBatchFn:
    """A `predict_batch_fn` running `model.generate` on prompts built by the data layer (`Predictor.batch_fn`)."""
    return Predictor(model, tokenizer, data_cfg, decode).batch_fn(all_ids)


def checkpoint_train_config(ckpt: Path) -> dict[str, Any]:
    p = ckpt / "train_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except ValueError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def default_method_name(ckpt: Path) -> str:
    """The trainer's recorded method (e.g. "flythinker", "sft"), else by the presence of a Reasoner."""
    method = (checkpoint_train_config(ckpt).get("model") or {}).get("method")
    if method:
        return str(method)
    try:
        meta = json.loads((ckpt / "flythinker.json").read_text())
    except (OSError, ValueError):
        return ckpt.name
    return "flythinker" if meta.get("has_reasoner") else "sft"


def load_checkpoint(ckpt: str | Path, dtype: str = "auto"):
    """FlyThinker.from_pretrained(ckpt) on the default device, in eval mode, with its tokenizer."""
    import torch

    from .methods.flythinker.model import FlyThinker
    from .utils import autocast_dtype, default_device

    ckpt = Path(ckpt)
    device = default_device()
    if dtype == "auto":
        torch_dtype = autocast_dtype(device)
    else:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        model = FlyThinker.from_pretrained(ckpt, dtype=torch_dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"cannot load checkpoint {ckpt}: {str(e).splitlines()[0]}") from None
    if model.tokenizer is None:
        raise UserError(f"{ckpt}/generator has no tokenizer files; save the checkpoint with its tokenizer")
    return model.to(device).eval(), model.tokenizer


__all__ = ["Predictor", "checkpoint_train_config", "decode_new_tokens", "default_method_name", "load_checkpoint",
           "model_predict_fn"]
