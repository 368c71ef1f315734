"""Model resolution: what `--generator` / `--reasoner` name, turned into loaded HF causal LMs and one tokenizer.

Owns: the one tokenizer loader (`load_tokenizer`), `load_models` (the embedded default, a named optional embedded
model such as gemma3-270m, a local directory or a hub id; a Reasoner as the Generator's first k layers, a separate
model, or none), `truncated_reasoner` (with `truncated_config`, the depth cut of a config), and the check that two
models embed the same token ids (`check_vocabularies`). Every method builds its models through here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .default_model import (
    DEFAULT_NUM_LAYERS,
    DEFAULT_REASONER_LAYERS,
    embedded_spec,
    load_default_generator,
    load_default_tokenizer,
)
from .hf import embedding_rows
from .utils import UserError, resolve_dtype


def _ensure_pad(tok: Any) -> Any:
    """A pad token is required for batching; tokenizers without one pad with EOS (attention masks keep them apart)."""
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def default_reasoner_layers(num_layers: int) -> int:
    """Default Reasoner depth for a Generator of `num_layers` layers: the default model's fraction (8/30), >= 1."""
    return max(1, min(num_layers, round(num_layers * DEFAULT_REASONER_LAYERS / DEFAULT_NUM_LAYERS)))


def _truncate(generator: torch.nn.Module, k: int) -> torch.nn.Module:
    try:
        return truncated_reasoner(generator, k).eval()
    except ValueError as e:
        raise UserError(f"--reasoner {k}: {e}") from None


def load_default_models(reasoner_layers: int | None = None, dtype: torch.dtype = torch.float32):
    """(generator, reasoner, tokenizer): SmolLM2-135M-Instruct and a copy of its first `reasoner_layers` layers
    (DEFAULT_REASONER_LAYERS when None). Converts the embedded GGUF on first use."""
    generator = load_default_generator(dtype)
    k = DEFAULT_REASONER_LAYERS if reasoner_layers is None else int(reasoner_layers)
    return generator, _truncate(generator, k), load_default_tokenizer()


_NONE = {"none", "no", "off", "false", ""}
_DEFAULT = {"default", "auto"}


def load_tokenizer(spec: str | None = None, flag: str = "--generator") -> Any:
    """The one tokenizer loader: the tokenizer `load_models(spec, ...)` would return, without loading any weights.

    spec: None / "default" (the embedded model's), a named embedded model ("gemma3-270m"), "tiny" (the built-in
    test tokenizer), a saved FlyThinker directory (its generator/), a tokenizer or model directory, or a hub id.
    `flag` names the option in errors."""
    if _is_default(spec):
        return load_default_tokenizer()
    if (embedded := embedded_spec(spec)) is not None:
        return load_default_tokenizer(embedded)
    if str(spec) == "tiny":
        from .testing import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    p = Path(str(spec)).expanduser()
    if (p / "flythinker.json").is_file():
        p = p / "generator"
    try:
        return _ensure_pad(AutoTokenizer.from_pretrained(str(p) if p.is_dir() else str(spec)))
    except Exception as e:  # noqa: BLE001 -- any loading failure is the user's folder or id: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} {spec}: cannot load its tokenizer ({first})") from None


def _is_default(name: str | None) -> bool:
    return name is None or str(name).strip().lower() in _DEFAULT


def _load_lm(name: str, role: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """A causal LM (+ its tokenizer, or None when the directory has none) from a local dir or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(name).expanduser()
    if p.is_dir() and (p / "flythinker.json").is_file():
        raise UserError(f"--{role} {name}: this is a saved FlyThinker model (generator/ + reasoner/); pass "
                        f"{p / 'generator'} or load it with FlyThinker.from_pretrained")
    looks_local = p.is_absolute() or name.startswith((".", "~")) or p.exists() or name.count("/") > 1
    if looks_local and not p.is_dir():
        raise UserError(f"--{role} {name}: no such directory")
    src = str(p) if p.is_dir() else name
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--{role} {name}: cannot load a causal LM ({first})") from None
    try:
        tok = _ensure_pad(AutoTokenizer.from_pretrained(src))
    except (OSError, ValueError, TypeError):
        tok = None
    return model, tok


def _parse_reasoner(reasoner: str | int | None) -> tuple[str, Any]:
    """-> ("none", None) | ("layers", k) | ("default", None) | ("model", name)."""
    if isinstance(reasoner, bool):
        raise UserError(f"--reasoner: expected a layer count, a model path/id or 'none'; got {reasoner!r}")
    if isinstance(reasoner, int):
        return "layers", reasoner
    if reasoner is None or _is_default(reasoner):
        return "default", None
    s = str(reasoner).strip()
    if s.lower() in _NONE:
        return "none", None
    if re.fullmatch(r"[+-]?\d+", s):
        return "layers", int(s)
    return "model", s


def load_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The dtype to load training weights in from a `model.dtype` value: "auto" is float32 on every device (fp32
    master weights; bf16 compute comes from train.precision's autocast), the other names as named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32
    try:
        return resolve_dtype(dtype, field="model.dtype")
    except ValueError as e:
        raise UserError(str(e)) from None


def load_models(generator: str | None = None, reasoner: str | int | None = None,
                dtype: str | torch.dtype = torch.float32):
    """Resolve `--generator` / `--reasoner` to (generator, reasoner or None, tokenizer).

    generator: None / "default" = the embedded SmolLM2-135M-Instruct; a named optional embedded model
        (`flythinker.default_model.EMBEDDED_MODELS`: "gemma3-270m", which needs its extra); otherwise a local
        directory or a hub id (loaded with AutoModelForCausalLM; it must have a tokenizer).
    reasoner: an int k (or a string of digits) = a copy of the Generator's first k layers; a directory or hub id =
        a separate model embedding the same token ids (checked here); "none" = no Reasoner (the SFT baseline);
        None / "default" = the first DEFAULT_REASONER_LAYERS layers for the default Generator, the spec's
        `reasoner_layers` for a named embedded one (6 of Gemma-3-270m's 18), and the same depth fraction (8/30,
        rounded, >= 1) of any other Generator.
    dtype: the weights' dtype, a torch dtype or a `model.dtype` name (`load_dtype`: "auto" = float32).
    Raises UserError (one line) for anything the user can fix.
    """
    dtype = load_dtype(dtype)
    kind, value = _parse_reasoner(reasoner)
    embedded = embedded_spec(generator)
    if _is_default(generator):
        gen = load_default_generator(dtype)
        tok = load_default_tokenizer()
    elif embedded is not None:
        gen = load_default_generator(dtype, embedded)
        tok = load_default_tokenizer(embedded)
    else:
        gen, tok = _load_lm(str(generator), "generator", dtype)
        if tok is None:
            raise UserError(f"--generator {generator}: no tokenizer found next to the model")
    n_layers = getattr(gen.config, "num_hidden_layers", None)
    if kind == "none":
        return gen, None, tok
    if kind == "default":
        if n_layers is None:
            raise UserError("--reasoner: the Generator's config has no num_hidden_layers; pass a Reasoner "
                            "model or 'none'")
        value = (DEFAULT_REASONER_LAYERS if _is_default(generator) else embedded.reasoner_layers
                 if embedded is not None else default_reasoner_layers(n_layers))
        kind = "layers"
    if kind == "layers":
        if n_layers is not None and not 1 <= value <= n_layers:
            raise UserError(f"--reasoner {value}: a truncated Reasoner needs 1..{n_layers} layers "
                            f"(the Generator has {n_layers})")
        return gen, _truncate(gen, value), tok
    rea, rtok = _load_lm(value, "reasoner", dtype)
    try:
        check_vocabularies(gen, rea, tok, rtok)
    except ValueError as e:
        raise UserError(f"--reasoner {value}: {e}") from None
    return gen, rea, tok


def check_vocabularies(generator: nn.Module, reasoner: nn.Module, tokenizer: Any = None,
                       reasoner_tokenizer: Any = None) -> None:
    """Raise a one-line ValueError unless every token id the Generator can see also indexes the Reasoner's table.

    Padded tables of different sizes (Qwen2.5 0.5B vs 7B: 151936 vs 152064 rows, 151665 real tokens) are fine as
    long as the real vocabulary (the tokenizer's length when known) fits in both."""
    g_rows, r_rows = embedding_rows(generator), embedding_rows(reasoner)
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


def truncated_config(config: Any, num_layers: int, owner: str = "") -> Any:
    """A copy of a decoder config cut to its first `num_layers` layers: `num_hidden_layers` and the per-layer
    attention types (`layer_types`: "sliding_attention" / "full_attention" in Gemma-3, Qwen2/3, ...) together.

    The types are the first k entries, not re-derived from a pattern: layer i of the copy is layer i of the
    Generator, with weights trained for that attention type. Gemma-3's RoPE settings (`rope_parameters`) are keyed
    by type, not by layer, so they need no cut. `owner` names the model in errors (ValueError, one line)."""
    cfg = copy.deepcopy(config)
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"{owner}: config has no num_hidden_layers")
    if not 1 <= num_layers <= n:
        raise ValueError(f"num_layers must be in [1, {n}] for this Generator; got {num_layers}")
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        if len(types) != n:
            raise ValueError(f"{owner}: config.layer_types has {len(types)} entries for {n} layers")
        cfg.layer_types = list(types)[:num_layers]
    cfg.num_hidden_layers = num_layers
    return cfg


def truncated_reasoner(generator: nn.Module, num_layers: int) -> nn.Module:
    """A Reasoner made of the Generator's embeddings, first `num_layers` decoder layers, final norm and head.

    It is a copy with its own weights (updating one model never touches the other) and shares the tokenizer.
    Works for any HF causal LM whose layers live under `...layers.<i>.` and whose config has `num_hidden_layers`
    (per-layer attention types are cut with it: `truncated_config`).
    """
    cfg = truncated_config(generator.config, num_layers, type(generator).__name__)
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


__all__ = ["check_vocabularies", "default_reasoner_layers", "load_default_models", "load_dtype", "load_models",
           "load_tokenizer", "truncated_config", "truncated_reasoner"]
