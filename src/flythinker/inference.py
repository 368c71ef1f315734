"""Inference from a saved or in-memory model: the `Predictor` that the generate verb, the experiments and the
server share. It builds each example's prompt with the data layer, decodes with the model's `generate` / `stream`
under one `DecodeConfig`, and turns new tokens into text.

Also the checkpoint side of a safe `generate`: `validate_checkpoint` / `load_checkpoint` turn a damaged checkpoint
into one line naming the file before any output is touched, and `run_fingerprint` gives the checkpoint, data and
decode fingerprints every predictions line records, so a resume with another model or settings is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .decoding.sampling import DecodeConfig
from .predictions import PredictBatchFn
from .utils import UserError

_log = logging.getLogger("flythinker.inference")


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
                        dtype: str = "auto", reasoner_device: str = "") -> Predictor:
        """Load `ckpt` (see `load_checkpoint`, which places the Reasoner on `reasoner_device` when given; "auto"
        picks the faster weights dtype at `decode.batch_size`); prompt settings default to the checkpoint's
        training ones."""
        from .config import from_dict
        from .data import DataConfig

        decode = decode or DecodeConfig()
        model, tok = load_checkpoint(ckpt, dtype, reasoner_device=reasoner_device, batch_size=decode.batch_size)
        if data_cfg is None:
            saved = checkpoint_train_config(Path(ckpt)).get("data")
            data_cfg = from_dict(DataConfig, dict(saved) if isinstance(saved, dict) else {},
                                 where=f"{ckpt}/train_config.json data")
        return cls(model, tok, data_cfg, decode)

    def _kwargs(self, seed: int | None) -> dict[str, Any]:
        d = self.decode
        return dict(max_new_tokens=d.max_new_tokens, do_sample=d.do_sample, temperature=d.temperature,
                    top_p=d.top_p, top_k=d.top_k, seed=seed, eos_token_id=self.eos_ids or None,
                    repetition_penalty=d.repetition_penalty, no_repeat_ngram_size=d.no_repeat_ngram_size,
                    min_new_tokens=d.min_new_tokens, penalty_scope=d.penalty_scope, copy_bonus=d.copy_bonus,
                    copy_ngram=d.copy_ngram, pad_token_id=self.pad, concurrent=d.concurrent, cpu_threads=d.cpu_threads)

    def encode(self, batch: Sequence[Any]) -> dict[str, Any]:
        """Left-padded "input_ids" and "attention_mask" of the batch's prompts, plus any further tensors a method's
        decode reads (passed to `generate` / `stream` as keywords, see `_inputs`). A model with its own
        `encode_prompts(examples, tokenizer, data_cfg, store=...)` builds them (CoS: a second, history-free prompt;
        LLM-TRSR: the summary in the prompt); every other model gets the data layer's prompt."""
        from .data import collate, encode_example

        own = getattr(self.model, "encode_prompts", None)
        if callable(own):
            enc = own(batch, self.tokenizer, self.data_cfg, store=self.store)
            return {k: v.to(self.device) for k, v in enc.items()}
        feats = [encode_example(ex, self.tokenizer, self.data_cfg, with_response=False, store=self.store)
                 for ex in batch]
        enc = collate(feats, self.pad, padding_side="left")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    @staticmethod
    def _inputs(enc: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(input_ids, keyword inputs: attention_mask and any method-specific tensors) of an `encode` result."""
        return enc["input_ids"], {k: v for k, v in enc.items() if k != "input_ids"}

    def predict(self, batch: Sequence[Any], seed: int | None = None) -> list[str]:
        """One prediction string per example, in order (one left-padded generate call)."""
        return [text for text, _ in self.predict_with_extras(batch, seed)]

    def predict_with_extras(self, batch: Sequence[Any], seed: int | None = None) -> list[tuple[str, dict | None]]:
        """(text, side outputs or None) per example. A method whose decode produces more than the response (CoT's
        reasoning) leaves `model.last_generation_extras`: one dict per row, whose `*_ids` entries are token ids
        decoded here to text under the key without `_ids`."""
        import torch

        enc = self.encode(batch)
        if hasattr(self.model, "last_generation_extras"):
            self.model.last_generation_extras = None
        with torch.no_grad():
            ids, inputs = self._inputs(enc)
            out = self.model.generate(ids, **inputs, **self._kwargs(seed))
        texts = [decode_new_tokens(row, self.tokenizer, self.eos_ids) for row in out.tolist()]
        extras = getattr(self.model, "last_generation_extras", None) or [None] * len(texts)
        return [(t, self._decode_extra(e)) for t, e in zip(texts, extras)]

    def _decode_extra(self, extra: dict | None) -> dict | None:
        if not extra:
            return None
        out = {}
        for k, v in extra.items():
            if k.endswith("_ids"):
                out[k[: -len("_ids")]] = decode_new_tokens(v, self.tokenizer, self.eos_ids)
            else:
                out[k] = v
        return out

    def stream(self, example: Any, seed: int | None = None) -> Iterator[str]:
        """The prediction of one example as text pieces, each yielded as soon as its tokens are decoded (a piece
        can hold several tokens when a character spans them)."""
        enc = self.encode([example])
        ids: list[int] = []
        text = ""
        ids_in, inputs = self._inputs(enc)
        for col in self.model.stream(ids_in, **inputs, **self._kwargs(seed)):
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

        def predict(batch: list[Any]) -> list[Any]:
            first = batch[0].get("id") if isinstance(batch[0], dict) else getattr(batch[0], "id", None)
            chunk = position.get(str(first), 0) // bs
            return [text if extra is None else {"text": text, "extra": extra}
                    for text, extra in self.predict_with_extras(batch, seed=base + chunk)]

        return predict


def model_predict_fn(model: Any, tokenizer: Any, data_cfg: Any, decode: DecodeConfig,
                     all_ids: Sequence[str] | None = None) -> PredictBatchFn:
    """A `predict_batch_fn` running `model.generate` on prompts built by the data layer (`Predictor.batch_fn`)."""
    return Predictor(model, tokenizer, data_cfg, decode).batch_fn(all_ids)


def checkpoint_train_config(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's train_config.json (the trainer's full config), or {} when it has none. A file that is there
    but unreadable, not JSON or not an object is a UserError naming it: prompts silently built with other settings
    than training's would be worse than an error."""
    p = Path(ckpt) / "train_config.json"
    if not p.exists():
        return {}
    return _json_object(p, "checkpoint training config")


def _json_object(p: Path, what: str, any_value: bool = False) -> Any:
    """A JSON file that must hold an object (any JSON value with `any_value`); one line naming the file otherwise."""
    from .safeio import read_text

    text = read_text(p, what)
    try:
        obj = json.loads(text)
    except RecursionError:
        raise UserError(f"{p}: {what} is not valid JSON (nested too deeply); the checkpoint is damaged") from None
    except ValueError as e:
        raise UserError(f"{p}: {what} is not valid JSON ({str(e).splitlines()[0]}); the checkpoint is damaged") \
            from None
    if not any_value and not isinstance(obj, dict):
        raise UserError(f"{p}: {what} must be a JSON object, got {type(obj).__name__}; the checkpoint is damaged")
    return obj


def default_method_name(ckpt: Path) -> str:
    """The trainer's recorded method (e.g. "flythinker", "sft"), else the checkpoint's own (`checkpoint_method`)."""
    method = (checkpoint_train_config(ckpt).get("model") or {}).get("method")
    if method:
        return str(method)
    return checkpoint_method(ckpt)


def _lm_dirs(meta: dict[str, Any]) -> list[str]:
    return ["generator", "reasoner"] if meta.get("has_reasoner") else ["generator"]


def validate_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """Check a FlyThinker checkpoint directory's structure before anything loads it, and return its flythinker.json.

    Each problem is a UserError naming the file: a missing or non-directory checkpoint; flythinker.json missing,
    binary, not JSON, not an object or without its "flythinker" settings (or with invalid ones); a missing
    generator/ (or reasoner/ when the checkpoint says it has one) or its config.json; a JSON file in them that does
    not parse; no weights; a truncated or damaged .safetensors file (its header and extent are checked, which reads
    only the header); a train_config.json that is not a JSON object. Loading can still fail later in ways this does not foresee: `load_checkpoint` turns those
    into one line too."""
    from .config import ConfigError

    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise UserError(f"checkpoint {ckpt}: not found")
    if not ckpt.is_dir():
        raise UserError(f"checkpoint {ckpt}: not a directory (a FlyThinker checkpoint is a folder with "
                        f"flythinker.json)")
    meta_file = ckpt / "flythinker.json"
    if not meta_file.exists():
        raise UserError(f"{ckpt}: not a FlyThinker checkpoint (no flythinker.json)")
    meta = _json_object(meta_file, "checkpoint config")
    if not isinstance(meta.get("flythinker"), dict):
        raise UserError(f"{meta_file}: no 'flythinker' settings object; not written by FlyThinker.save_pretrained, "
                        f"or damaged")
    from .methods.flythinker.config import FlyThinkerConfig

    try:
        FlyThinkerConfig.from_dict(meta["flythinker"])
    except (ConfigError, ValueError, TypeError) as e:
        raise UserError(f"{meta_file}: {str(e).splitlines()[0]}") from None
    weights = ["fusion.safetensors"] if (meta.get("has_projection") or meta.get("has_gate")
                                              or meta.get("calibrated")) else []
    for name in _lm_dirs(meta):
        d = ckpt / name
        if not d.is_dir():
            raise UserError(f"{d}: missing (the checkpoint's {name} model folder)")
        if not (d / "config.json").is_file():
            raise UserError(f"{d / 'config.json'}: missing (the {name} model's config)")
        for f in sorted(d.glob("*.json")):  # configs, tokenizer, shard index: damaged ones fail deep in transformers
            _json_object(f, f"{name} file", any_value=f.name != "config.json")
        found = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))
        if not found:
            raise UserError(f"{d}: no model weights (model.safetensors); the checkpoint is incomplete")
        weights += [str(f.relative_to(ckpt)) for f in found if f.suffix == ".safetensors"]
    for rel in weights:
        _check_safetensors(ckpt / rel)
    checkpoint_train_config(ckpt)  # the prompt settings generate defaults to
    return meta


def _check_safetensors(p: Path) -> None:
    from safetensors import safe_open

    if not p.is_file():
        raise UserError(f"{p}: missing (the checkpoint says it has these weights)")
    try:
        with safe_open(str(p), framework="pt"):
            pass
    except Exception as e:  # noqa: BLE001 -- SafetensorError and OSError alike mean the file is unusable
        raise UserError(f"{p}: damaged weights file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        f"copy or save the checkpoint again") from None


def checkpoint_fingerprint(ckpt: str | Path) -> str:
    """A digest of everything in a checkpoint that decides its predictions: flythinker.json, train_config.json,
    fusion.safetensors and every file under generator/ and reasoner/ (weights, configs, tokenizer), by content, so
    a retrained or other checkpoint differs and a copied one does not. training_state.pt (optimizer state) is
    left out."""
    from .safeio import file_digest, fingerprint

    ckpt = Path(ckpt)
    files = [ckpt / n for n in ("flythinker.json", "train_config.json", "fusion.safetensors")]
    for name in ("generator", "reasoner"):
        if (ckpt / name).is_dir():
            files += sorted(p for p in (ckpt / name).rglob("*") if p.is_file())
    digests = {}
    for p in files:
        if p.is_file():
            try:
                digests[p.relative_to(ckpt).as_posix()] = file_digest(p, 32)
            except OSError as e:
                raise UserError(f"{p}: cannot read ({e.strerror})") from None
    return fingerprint(digests)


TRAINING_ONLY_DATA_FIELDS: tuple[str, ...] = ("eos_after_cut",)
"""DataConfig fields that shape only training targets, never a prompt: `data_fingerprint` leaves them out."""


def data_fingerprint(examples: Sequence[Any], data_cfg: Any) -> str:
    """A digest of the examples (ids, users, inputs, references, profiles, task; by content, so the same data
    under another path agrees and an edited file does not) and of the prompt settings they are rendered with."""
    import dataclasses
    import hashlib

    h = hashlib.sha256()
    for ex in examples:
        rec = dataclasses.asdict(ex) if dataclasses.is_dataclass(ex) else dict(ex)
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "replace"))
        h.update(b"\n")
    from .safeio import fingerprint

    prompt = dataclasses.asdict(data_cfg) if dataclasses.is_dataclass(data_cfg) else dict(data_cfg)
    # Settings that shape only training targets, added after runs were recorded, do not enter: they leave every
    # prompt as it was (a model trained with them differs, and the checkpoint fingerprint sees that), and their
    # absence keeps the fingerprints of earlier runs' predictions valid for resuming.
    for name in TRAINING_ONLY_DATA_FIELDS:
        prompt.pop(name, None)
    return fingerprint({"examples": h.hexdigest(), "prompt": prompt})


def decode_fingerprint(decode: DecodeConfig, dtype: Any = "auto") -> str:
    """A digest of the settings that decide the decoded text: new-token budget, batch size (chunk seeding,
    padding), the dtype, and for sampling its temperature, top-p, top-k and seed (greedy ignores those, so
    changing them does not block a greedy resume). The backend (`concurrent`, threads) does not enter.

    dtype: the weights' dtype as decoded (a torch dtype or its name, e.g. "bfloat16"), so fp32 and bf16 predictions
    never share a file; a bare "auto" is hashed as given (callers that know the device resolve it first, as
    `run_fingerprint` does)."""
    from .safeio import fingerprint

    d = decode
    if not isinstance(dtype, str):
        from .utils import dtype_name

        dtype = dtype_name(dtype)
    greedy = not d.do_sample or d.temperature == 0
    settings: dict[str, Any] = {"max_new_tokens": d.max_new_tokens, "batch_size": d.batch_size, "dtype": dtype,
                                "greedy": greedy, "eos_token_id": d.eos_token_id, "pad_token_id": d.pad_token_id}
    if not greedy:
        settings.update(temperature=d.temperature, top_p=d.top_p, top_k=d.top_k, seed=d.seed)
    # The anti-repetition settings enter only when on, so fingerprints of runs from before they existed still match.
    settings.update({k: v for k, off in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0),
                                         ("min_new_tokens", 0), ("penalty_scope", "all"), ("copy_bonus", 0.0))
                     if (v := getattr(d, k)) != off})
    if d.copy_bonus > 0:
        settings["copy_ngram"] = d.copy_ngram
    return fingerprint(settings)


def recorded_decode_dtype(predictions: str | Path, decode: DecodeConfig) -> Any:
    """The weights dtype a begun predictions file was decoded in: the one of float32 / bfloat16 whose decode
    fingerprint its first line records; None for a missing or empty file, or one matching neither (then the
    resume check names the mismatch as before)."""
    import torch

    try:
        with open(predictions, encoding="utf-8") as fh:
            first = json.loads(fh.readline() or "null")
    except (OSError, ValueError):
        return None
    found = (first.get("run") or {}).get("decode") if isinstance(first, dict) else None
    if not isinstance(found, str):
        return None
    return next((dt for dt in (torch.float32, torch.bfloat16) if decode_fingerprint(decode, dt) == found), None)


def run_fingerprint(ckpt: str | Path, examples: Sequence[Any], data_cfg: Any, decode: DecodeConfig,
                    dtype: str = "auto") -> dict[str, str]:
    """The `run` object stored in every predictions line (see flythinker.predictions): checkpoint, data + prompt
    settings, decode settings. `dtype` is the generate flag; "auto" is resolved to the dtype `load_checkpoint` will
    decode in on this machine (bf16 where native, else fp32), so a resume elsewhere never mixes the two."""
    from .utils import default_device, resolve_dtype

    decoded = resolve_dtype(dtype, default_device(), field="--dtype")
    return {"checkpoint": checkpoint_fingerprint(ckpt), "data": data_fingerprint(examples, data_cfg),
            "decode": decode_fingerprint(decode, decoded)}


def checkpoint_method(ckpt: Path) -> str:
    """The registered method whose `load` reads this checkpoint: the one recorded in flythinker.json ("method",
    written by methods other than FlyThinker/SFT), else FlyThinker with a Reasoner, SFT without."""
    try:
        meta = json.loads((Path(ckpt) / "flythinker.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "flythinker"
    if isinstance(meta, dict) and isinstance(meta.get("method"), str):
        return meta["method"]
    return "flythinker" if isinstance(meta, dict) and meta.get("has_reasoner") else "sft"


def checkpoint_decode_dtype(ckpt: str | Path, dtype: str, batch_size: int):
    """The `decoding.dtype_choice.DtypeChoice` that `load_checkpoint(ckpt, dtype, batch_size=batch_size)` makes,
    known before the weights load where possible, so a caller can fingerprint its predictions with it first and
    then load with the resolved name (`choice.name`): an explicit dtype or the fixed rule at once; a measured
    choice from the cache, looked up by the checkpoint's model configs (built on the meta device: no weights);
    only on a cache miss is the checkpoint loaded once to measure (the answer is then cached for the real load)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .decoding import dtype_choice
    from .utils import default_device

    device = default_device()
    if dtype != "auto" or not dtype_choice.measures(device):
        return dtype_choice.choose_decode_dtype([], batch_size, dtype, device=device, field_name="--dtype")
    ckpt = Path(ckpt)
    meta = validate_checkpoint(ckpt)
    try:
        with torch.device("meta"):
            shells = [AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt / name))
                      for name in _lm_dirs(meta)]
    except Exception:  # noqa: BLE001 -- an unusual checkpoint: measure on the loaded models instead
        shells = []
    if shells:
        cached = dtype_choice.cached_decode_dtype(shells, batch_size)
        if cached is not None:
            return cached
    model, _ = load_checkpoint(ckpt, dtype, batch_size=batch_size)
    return model.decode_dtype_choice


def load_checkpoint(ckpt: str | Path, dtype: str = "auto", reasoner_device: str = "", batch_size: int | None = None):
    """The checkpoint's method `load`s it (see `checkpoint_method`) on the default device, in eval mode, with its
    tokenizer; a FlyThinker's Reasoner then goes to `reasoner_device` when given (e.g. "cuda:1": each model on its
    own GPU; `decoding.concurrency.place_reasoner`; a device that does not exist is a UserError naming it).

    dtype "auto" with a `batch_size`: the weights dtype that decodes faster at that batch size
    (`decoding.dtype_choice.choose_decode_dtype`: measured once per machine, models and batch size on a CPU with
    native bf16, cached; the fixed rule elsewhere); recorded as `model.decode_dtype_choice` and logged. "auto"
    without one: the fixed rule (`utils.resolve_dtype`), as `run_fingerprint(..., "auto")` records it.

    The directory is checked first (`validate_checkpoint`); whatever loading still raises (transformers,
    safetensors, torch) becomes one UserError naming the checkpoint."""
    from .decoding import dtype_choice
    from .methods import get_method
    from .utils import default_device, resolve_dtype

    ckpt = Path(ckpt)
    validate_checkpoint(ckpt)
    method = get_method(checkpoint_method(ckpt))
    device = default_device()
    # auto: bf16 weights where the device computes bf16 natively (utils.native_bf16), else fp32, whatever dtype the
    # checkpoint was saved in; the run fingerprint records the same resolution. A measured choice loads fp32 and
    # casts after measuring (an fp32 -> bf16 cast is what a bf16 load does anyway).
    measured = dtype == "auto" and batch_size is not None and dtype_choice.measures(device)
    torch_dtype = resolve_dtype("float32" if measured else dtype, device, field="--dtype")
    try:
        model = method.load(ckpt, dtype=torch_dtype)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- a damaged checkpoint can raise anything from the loaders
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise UserError(f"cannot load checkpoint {ckpt}: {first}") from None
    if model.tokenizer is None:
        raise UserError(f"{ckpt}/generator has no tokenizer files; save the checkpoint with its tokenizer")
    model = model.to(device).eval()
    if measured:
        choice = dtype_choice.choose_decode_dtype(dtype_choice.decode_lms(model), int(batch_size), device=device)
        model = model.to(choice.dtype)
        model.decode_dtype_choice = choice
        _log.info("%s", choice.describe())
    elif batch_size is not None:
        model.decode_dtype_choice = dtype_choice.DtypeChoice(torch_dtype, "explicit" if dtype != "auto" else "rule",
                                                             int(batch_size))
    if reasoner_device:
        from .config import ConfigError
        from .decoding.concurrency import place_reasoner

        try:
            place_reasoner(model, reasoner_device)
        except ConfigError as e:
            raise UserError(str(e)) from None
    return model, model.tokenizer


__all__ = ["Predictor", "checkpoint_decode_dtype", "checkpoint_fingerprint", "checkpoint_train_config", "data_fingerprint", "decode_fingerprint",
           "checkpoint_method", "decode_new_tokens", "default_method_name", "load_checkpoint", "model_predict_fn", "run_fingerprint",
           "validate_checkpoint"]
