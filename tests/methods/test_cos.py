"""CoS (context steering): the mixing rule, λ = 0 is the plain RAG Generator token for token, the two KV caches
against an uncached reference in a left-padded batch, the backends agree, the Predictor builds both prompts,
save/load, and the registry entry."""

import dataclasses
import json

import pytest
import torch

from flythinker import FlyThinker
from flythinker.data import DataConfig, Example
from flythinker.data.collate import encode_example
from flythinker.decoding import loop
from flythinker.decoding.sampling import DecodeConfig
from flythinker.inference import Predictor
from flythinker.methods import METHODS, ModelArgs
from flythinker.methods.configs import CoSConfig
from flythinker.methods.cos import CoS, CoSModel, steer_log_probs
from flythinker.testing import tiny_lm

DATA = DataConfig(k=2, profile_tokens=64, query_tokens=24, target_tokens=16, system_prompt="")


def _lm(seed):
    """A tiny Llama with larger random weights than HF's init, so greedy decodes are varied (at the default 0.02
    every row repeats one token and steering could not show)."""
    from transformers import AutoModelForCausalLM

    from flythinker.testing import tiny_config

    cfg = tiny_config(max_positions=1024)
    cfg.initializer_range = 0.2
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _examples(n=3):
    out = []
    for i in range(n):
        items = [{"text": f"I loved this album {j}, the melodies are warm" + "!" * (i + j), "title": "warm"}
                 for j in range(i + 1)]
        out.append(Example(id=f"e{i}", user_id=f"u{i}", input=f"Write the review of album {i}" + " now" * i,
                           output="I loved it.", profile=items, task="generic"))
    return out


def _kw(tokenizer, n=6, **extra):
    return {"max_new_tokens": n, "eos_token_id": [], "pad_token_id": tokenizer.pad_token_id, **extra}


def test_steer_log_probs_is_the_cos_formula():
    torch.manual_seed(0)
    a, b = torch.randn(2, 7), torch.randn(2, 7)
    lp_a, lp_b = a.log_softmax(-1), b.log_softmax(-1)
    assert torch.allclose(steer_log_probs(a, b, 1.5), lp_a + 1.5 * (lp_a - lp_b), atol=1e-6)
    assert torch.equal(steer_log_probs(a, b, 0.0), lp_a)                     # λ = 0: the with-history model
    assert torch.allclose(steer_log_probs(a, b, -1.0), lp_b, atol=1e-6)      # λ = -1: the history-free model
    # shifting either model's logits by a constant changes nothing (only log-probabilities enter)
    assert torch.allclose(steer_log_probs(a + 3, b - 2, 2.0), steer_log_probs(a, b, 2.0), atol=1e-5)


def test_lambda_zero_is_the_plain_rag_generator_token_for_token(tokenizer):
    lm = _lm(3)
    cos, rag = CoSModel(lm, CoSConfig(lam=0.0)), FlyThinker(lm, None)
    enc = cos.encode_prompts(_examples(), tokenizer, DATA)
    assert enc["input_ids"].shape[0] == 3 and (enc["attention_mask"][:, 0] == 0).any()   # left-padded batch
    for extra in ({}, {"do_sample": True, "temperature": 0.8, "seed": 5}):
        plain = rag.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **_kw(tokenizer, 8, **extra))
        steered = cos.generate(**enc, **_kw(tokenizer, 8, **extra))
        assert torch.equal(steered, plain), extra
        assert len(set(plain.flatten().tolist())) > 3                          # a varied decode, not one token
    # through the Predictor (it asks the model for both prompts), as the study and the generate verb run it
    decode = DecodeConfig(max_new_tokens=6, batch_size=3)
    assert Predictor(cos, tokenizer, DATA, decode).predict(_examples()) == \
        Predictor(rag, tokenizer, DATA, decode).predict(_examples())


def _reference(lm, ctx_ids, noctx_ids, lam, n):
    """Uncached greedy CoS of one unpadded row: full forwards of both prompts + the tokens so far, every step."""
    out = []
    for _ in range(n):
        a = lm(torch.tensor([ctx_ids + out])).logits[0, -1]
        b = lm(torch.tensor([noctx_ids + out])).logits[0, -1]
        out.append(int(torch.argmax(steer_log_probs(a[None], b[None], lam))))
    return out


def test_two_caches_in_a_left_padded_batch_equal_an_uncached_reference_per_row(tokenizer):
    lm = _lm(4)
    model = CoSModel(lm, CoSConfig(lam=2.0))
    examples = _examples()
    enc = model.encode_prompts(examples, tokenizer, DATA)
    out = model.generate(**enc, **_kw(tokenizer, 6))
    plain_cfg = dataclasses.replace(DATA, retrieval="none", k=0)
    with torch.no_grad():
        for i, ex in enumerate(examples):
            ctx = encode_example(ex, tokenizer, DATA, with_response=False)["prompt_ids"]
            noctx = encode_example(ex, tokenizer, plain_cfg, with_response=False)["prompt_ids"]
            assert len(noctx) < len(ctx)                                         # the history is what differs
            assert out[i].tolist() == _reference(lm, ctx, noctx, 2.0, 6), i
    rag = FlyThinker(lm, None).generate(enc["input_ids"], attention_mask=enc["attention_mask"], **_kw(tokenizer, 6))
    assert not torch.equal(out, rag)                                             # λ = 2 steers this model


def test_backends_agree_and_the_bare_loop_decoder_steers_nothing(tokenizer):
    lm = _lm(4)
    model = CoSModel(lm, CoSConfig(lam=2.0))
    enc = model.encode_prompts(_examples(), tokenizer, DATA)
    seq = model.generate(**enc, **_kw(tokenizer, 5, concurrent=False))
    thr = model.generate(**enc, **_kw(tokenizer, 5, concurrent="threads", cpu_threads=(1, 1)))
    assert torch.equal(seq, thr)
    cols = list(model.stream(**enc, **_kw(tokenizer, 5)))
    assert torch.equal(torch.stack(cols, 1), seq)
    # the bare loop (timing, the server's engine) has one prompt per row: both caches read it -> RAG's tokens
    bare = loop.generate(model, enc["input_ids"], enc["attention_mask"], **_kw(tokenizer, 5))
    rag = FlyThinker(lm, None).generate(enc["input_ids"], attention_mask=enc["attention_mask"], **_kw(tokenizer, 5))
    assert torch.equal(bare, rag)


def test_generate_without_the_history_free_prompt_is_one_line(tokenizer):
    model = CoSModel(tiny_lm("llama", seed=1))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="plain_input_ids"):
        model.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="rows"):
        model.generate(ids, plain_input_ids=torch.tensor([[5], [6]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, plain_input_ids=torch.tensor([[5, 6]]), plain_attention_mask=torch.tensor([[1, 0]]),
                       max_new_tokens=2)


def test_save_and_load_round_trip(tokenizer, tmp_path):
    from flythinker.inference import checkpoint_method, load_checkpoint, validate_checkpoint

    model = CoSModel(tiny_lm("llama", seed=2, max_positions=1024), CoSConfig(lam=1.5), tokenizer=tokenizer)
    enc = model.encode_prompts(_examples(2), tokenizer, DATA)
    before = model.generate(**enc, **_kw(tokenizer, 5))
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "flythinker.json").read_text())
    assert meta["method"] == "cos" and meta["cos"]["config"] == {"lam": 1.5}
    validate_checkpoint(tmp_path / "ckpt")
    assert checkpoint_method(tmp_path / "ckpt") == "cos"
    loaded = CoS().load(tmp_path / "ckpt")
    assert isinstance(loaded, CoSModel) and loaded.cos.lam == 1.5
    assert torch.equal(loaded.generate(**enc, **_kw(tokenizer, 5)), before)
    via, tok = load_checkpoint(tmp_path / "ckpt", dtype="float32")
    assert isinstance(via, CoSModel) and tok is not None
    # another λ at load time; a plain SFT directory loads as CoS with the defaults
    assert CoSModel.from_pretrained(tmp_path / "ckpt", config=CoSConfig(lam=0.0)).cos.lam == 0.0
    FlyThinker(tiny_lm("llama", seed=2), None, tokenizer=tokenizer).save_pretrained(tmp_path / "sft")
    assert CoSModel.from_pretrained(tmp_path / "sft").cos == CoSConfig()


def test_registry_entry_builds_the_untrained_generator_with_the_cos_section(tokenizer):
    from flythinker.config import ConfigError, from_dict

    m = METHODS["cos"]
    assert isinstance(m, CoS) and not m.trained and m.display == "CoS"
    args = dataclasses.replace(ModelArgs(), cos=CoSConfig(lam=3.0))
    assert m.model_args(args).method == "sft" and m.model_args(args).cos.lam == 3.0  # tuning-free, like RAG
    model = m.from_lms(tiny_lm("llama", seed=1), None, m.model_args(args), tokenizer)
    assert isinstance(model, CoSModel) and model.cos.lam == 3.0 and model.reasoner is None
    assert from_dict(ModelArgs, {"method": "sft", "cos": {"lam": -1}}).cos.lam == -1.0
    with pytest.raises(ConfigError, match="lam"):
        from_dict(ModelArgs, {"method": "sft", "cos": {"lam": "big"}})
    with pytest.raises(ConfigError, match="cos.lam"):
        CoSConfig(lam=float("nan"))
