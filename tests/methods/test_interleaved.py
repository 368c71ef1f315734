"""The interleaved foil: the cached, batched training forward against an uncached per-row reference (gradients
included), cached decoding against an uncached reference loop, padding invariance, save/load, training via `fit`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import flythinker.methods
from flythinker.data.collate import collate
from flythinker.methods import ModelArgs
from flythinker.methods.interleaved import Interleaved, InterleavedConfig, InterleavedModel
from flythinker.testing import tiny_lm, tiny_tokenizer
from flythinker.training.config import TrainArgs
from flythinker.training.loop import fit, validate

V = 384


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(flythinker.methods.METHODS, "interleaved", Interleaved())


def _model(every=3, rescale=True):
    return InterleavedModel(tiny_lm("llama", seed=1), InterleavedConfig(every=every, rescale=rescale)).eval()


def _features(n=3, seed=0, longest=9):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        p, r = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(1, longest, (1,), generator=g))
        ids = torch.randint(3, V, (p + r,), generator=g).tolist()
        feats.append({"prompt_ids": ids[:p], "response_ids": ids[p:] + [2]})
    return feats


# ------------------------------------------------------------------------------------------------------------------
# uncached references from the definition: a thought (the previous position's state) before y_1, y_{k+1}, ...

def _states(model, embeds, mask):
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return model.generator.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state


def _thought(model, h):
    if model.config.rescale:
        target = model.generator.get_input_embeddings().weight.detach().norm(dim=-1).mean()
        h = h * (target / h.norm(dim=-1, keepdim=True))
    return h


@torch.no_grad()
def _reference_decode(model, ids, mask, n):
    E = model.generator.get_input_embeddings().weight
    seq, m, out = E[ids], mask, []
    for j in range(n):                                            # choosing y_{j+1}
        if j % model.config.every == 0:
            e = _thought(model, _states(model, seq, m)[:, -1])
            seq, m = torch.cat([seq, e[:, None]], 1), torch.cat([m, m.new_ones(m.shape[0], 1)], 1)
        y = model.generator.lm_head(_states(model, seq, m)[:, -1]).argmax(-1)
        out.append(y)
        seq, m = torch.cat([seq, E[y][:, None]], 1), torch.cat([m, m.new_ones(m.shape[0], 1)], 1)
    return torch.stack(out, 1)


def _reference_loss(model, feat):
    """One row alone: build the stream with every thought from a full uncached pass, then one full pass."""
    E = model.generator.get_input_embeddings().weight
    seq = E[torch.tensor(feat["prompt_ids"])][None]
    predicted_at = []                                             # the column whose logits predict each y_j
    for j, y in enumerate(feat["response_ids"]):
        if j % model.config.every == 0:
            e = _thought(model, _states(model, seq, torch.ones(1, seq.shape[1], dtype=torch.long))[:, -1])
            seq = torch.cat([seq, e[:, None]], 1)
        predicted_at.append(seq.shape[1] - 1)
        seq = torch.cat([seq, E[y][None, None]], 1)
    logits = model.generator.lm_head(_states(model, seq, torch.ones(1, seq.shape[1], dtype=torch.long)))[0]
    return F.cross_entropy(logits[predicted_at], torch.tensor(feat["response_ids"]), reduction="sum")


# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("every,rescale", [(3, True), (1, False), (4, True)])
def test_batched_forward_equals_uncached_reference_per_row(every, rescale):
    model = _model(every, rescale)
    feats = _features(3)
    b = collate(feats, 0, padding_side="right")
    out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    R = max(len(f["response_ids"]) for f in feats)
    assert out.logits.shape == (3, R + math.ceil(R / every), V)
    assert out.thoughts.shape == (3, math.ceil(R / every), 32)
    assert int(out.n_tokens) == sum(len(f["response_ids"]) for f in feats)
    ref = sum(_reference_loss(model, f) for f in feats)
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
    alone = collate(feats[:1], 0, padding_side="right")                  # no padding: the mask-free path
    torch.testing.assert_close(model(alone["input_ids"], labels=alone["labels"]).loss_sum,
                               _reference_loss(model, feats[0]), rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for g, w in zip(torch.autograd.grad(out.loss_sum, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("every,rescale", [(3, True), (1, False), (5, True)])
def test_cached_batched_decode_equals_uncached_reference(every, rescale):
    model = _model(every, rescale)
    ids = torch.randint(3, V, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    new = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(new, _reference_decode(model, ids, mask, 8))
    assert model.last_generation_extras == [{"latent_steps": math.ceil(8 / every), "generated_tokens": 8}] * 3


def test_each_row_of_a_left_padded_batch_equals_its_prompt_alone():
    model = _model(2)
    prompts = [torch.randint(3, V, (n,)).tolist() for n in (5, 2, 8)]
    b = collate([{"prompt_ids": p} for p in prompts], 0)
    batched = model.generate(b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=6, eos_token_id=[])
    for i, p in enumerate(prompts):
        assert torch.equal(batched[i], model.generate(torch.tensor([p]), max_new_tokens=6, eos_token_id=[])[0])


def test_save_load_round_trip(tmp_path):
    from flythinker.training.checkpoint import check_checkpoint_files

    model = _model(3)
    model.tokenizer = tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "flythinker.json").read_text())
    assert meta["method"] == "interleaved" and meta["interleaved"] == {"every": 3, "rescale": True}
    loaded = Interleaved().load(tmp_path / "m").eval()
    assert loaded.config == model.config and loaded.tokenizer is not None
    ids = torch.randint(3, V, (2, 5))
    assert torch.equal(loaded.generate(ids, max_new_tokens=7, eos_token_id=[]),
                       model.generate(ids, max_new_tokens=7, eos_token_id=[]))
    check_checkpoint_files(tmp_path / "m")
    with pytest.raises(ValueError, match="not interleaved"):
        from flythinker.methods.coconut import CoconutModel

        CoconutModel(tiny_lm("llama", seed=1)).save_pretrained(tmp_path / "c")
        Interleaved().load(tmp_path / "c")


def test_fit_trains_and_the_config_is_validated(tmp_path):
    from flythinker.config import ConfigError

    for bad in ({"every": 0}, {"every": 2.5}, {"rescale": 1}):
        with pytest.raises(ConfigError):
            InterleavedConfig(**bad)
    model = Interleaved().from_lms(tiny_lm("llama", seed=1), None, ModelArgs(method="interleaved"))
    assert model.config == InterleavedConfig()
    feats = _features(2)
    loss0 = validate(model, feats, 0)
    args = TrainArgs(out_dir=str(tmp_path / "run"), batch_size=2, grad_accum=1, lr_generator=1e-2, warmup_ratio=0.0,
                     schedule="constant", progress=False, save_final=True, max_steps=6)
    res = fit(model, feats, args, pad_token_id=0)
    assert res.losses[-1] < res.losses[0] and validate(model, feats, 0) < loss0 - 0.5
    assert isinstance(Interleaved().load(res.final_dir), InterleavedModel)


def test_every_row_needs_a_prompt_token():
    model = _model()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="prompt token"):
        model(ids, labels=ids)                                     # all response, no prompt
