"""Coconut's curriculum: the stage features (hand-made and from the teacher), the loss mask, a mixed-stage batch
against each row computed alone by an uncached reference (gradients included), the trainer's stage-by-stage
order, a short fit that saves and loads, and curriculum off = today's features and checkpoint record."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from flythinker.config import ConfigError
from flythinker.data import DataConfig, Example, collate
from flythinker.data.collate import IGNORE_INDEX, encode_example
from flythinker.methods import ModelArgs
from flythinker.methods.base import Method
from flythinker.methods.coconut import (
    LATENT_SLOT,
    Coconut,
    CoconutConfig,
    CoconutModel,
    curriculum_feature,
    reasoning_steps,
    take_latent_slots,
)
from flythinker.methods.teachers import TeacherConfig, extractive_analysis
from flythinker.testing import tiny_lm
from flythinker.training.config import TrainArgs
from flythinker.training.loop import fit, windows_for_epoch

V = 384
S = LATENT_SLOT
DATA = DataConfig(k=2, profile_tokens=96, query_tokens=32, target_tokens=16, system_prompt="")


def _examples(n=3):
    out = []
    for i in range(n):
        items = [{"text": f"I loved this album because the melodies are warm. The lyrics are honest {j}!",
                  "title": "warm"} for j in range(3)]
        out.append(Example(id=f"e{i}", user_id=f"u{i % 2}", input=f"Write the review of album {i}",
                           output="I loved this album because the sound is great.", profile=items, task="generic"))
    return out


def _cfg(latents=2, stages=3, **kw):
    return CoconutConfig(latents=latents, curriculum=True, stages=stages,
                         teacher=TeacherConfig(cache="none"), **kw)


def _args(cfg):
    return ModelArgs(method="coconut", coconut=cfg)


# ------------------------------------------------------------------------------------------------------------------
# features

def test_stage_features_of_a_hand_made_example():
    prompt, steps, resp = [5, 6, 7], [[10, 11], [12], [13, 14]], [20, 2]
    feats = [curriculum_feature(prompt, steps, resp, k, latents=2, last=k == 3) for k in range(4)]
    assert feats[0]["input_ids"] == prompt + [10, 11, 12, 13, 14] + resp             # stage 0: the full reasoning
    assert feats[1]["input_ids"] == prompt + [S] * 2 + [12, 13, 14] + resp            # first step -> 2 thoughts
    assert feats[2]["input_ids"] == prompt + [S] * 4 + [13, 14] + resp
    assert feats[3]["input_ids"] == prompt + [S] * 6 + resp                           # last: no language reasoning
    for k, f in enumerate(feats):
        n_head = len(prompt) + 2 * k
        assert f["stage"] == k
        assert f["labels"][:n_head] == [IGNORE_INDEX] * n_head                        # prompt and slots unsupervised
        assert f["labels"][n_head:] == f["input_ids"][n_head:]                        # remaining reasoning + response
    # a last stage K below the number of steps drops the steps after the K-th as well (the paper's final stage)
    assert curriculum_feature(prompt, steps, resp, 1, latents=2, last=True)["input_ids"] == prompt + [S] * 2 + resp
    # a stage beyond the steps: no reasoning left, still k·c thoughts
    assert curriculum_feature(prompt, steps[:1], resp, 2, 2, last=False)["input_ids"] == prompt + [S] * 4 + resp


def test_reasoning_is_split_into_sentences():
    assert reasoning_steps("  The user writes short texts. They open with \"Hi\"!\n\nTone: warm ") == [
        "The user writes short texts.\n", "They open with \"Hi\"!\n", "Tone: warm\n"]
    assert reasoning_steps("   ") == []


def test_features_from_the_teacher_stage_by_stage(tokenizer):
    cfg = _cfg(latents=2, stages=2)
    exs = _examples(2)
    feats = Coconut().features(exs, tokenizer, DATA, args=_args(cfg))
    assert [f["stage"] for f in feats] == [0, 0, 1, 1, 2, 2]                           # stage-major, every example
    for i, ex in enumerate(exs):
        enc = encode_example(ex, tokenizer, DATA, with_response=True)
        P, R = len(enc["prompt_ids"]), len(enc["response_ids"])
        steps = [tokenizer.encode(s, add_special_tokens=False) for s in reasoning_steps(extractive_analysis(
            ex.profile[:2]))]
        assert len(steps) >= 3
        for k in range(3):
            f = feats[2 * k + i]
            assert f["input_ids"][:P] == enc["prompt_ids"] and f["input_ids"][-R:] == enc["response_ids"]
            assert f["input_ids"][P: P + 2 * k] == [S] * (2 * k)
            kept = f["input_ids"][P + 2 * k: -R]
            assert kept == ([] if k == 2 else [t for st in steps[k:] for t in st])
        assert tokenizer.decode(feats[i]["input_ids"][P:-R]).startswith(extractive_analysis(ex.profile[:2])[:30])


def test_curriculum_off_gives_todays_features_and_record(tokenizer, tmp_path):
    exs = _examples(2)
    today = Method.features(Coconut(), exs, tokenizer, DATA)
    assert Coconut().features(exs, tokenizer, DATA, args=ModelArgs(method="coconut")) == today
    assert Coconut().features(exs, tokenizer, DATA) == today
    assert today == [encode_example(ex, tokenizer, DATA, with_response=True) for ex in exs]
    assert CoconutConfig(stages=2).to_dict() == {"latents": 4, "rescale": False}       # unused settings unrecorded
    model = CoconutModel(tiny_lm("llama", seed=1), CoconutConfig(latents=3))
    assert model.n_thoughts == 3
    with pytest.raises(ValueError, match="curriculum is off"):
        b = collate([curriculum_feature([5, 6], [], [9, 2], 1, 3, True)], 0, padding_side="right")
        model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])


def test_config_is_validated_and_round_trips():
    for bad in ({"curriculum": "yes"}, {"stages": 0}, {"stages": 2.0}, {"stages": True}, {"teacher": 3},
                {"teacher": {"name": "oracle"}}, {"curriculum": True, "latents": 0}):
        with pytest.raises(ConfigError):
            CoconutConfig(**bad)
    cfg = CoconutConfig(latents=1, curriculum=True, stages=4, teacher={"name": "extractive", "cache": "none"})
    assert isinstance(cfg.teacher, TeacherConfig)
    d = cfg.to_dict()
    assert d["curriculum"] is True and d["stages"] == 4 and d["teacher"]["cache"] == "none"
    assert CoconutConfig.from_dict(json.loads(json.dumps(d))) == cfg


# ------------------------------------------------------------------------------------------------------------------
# the forward: per-row thoughts, masks, loss

def _states(model, embeds):
    return model.generator.model(inputs_embeds=embeds).last_hidden_state


def _reference_row(model, feat):
    """One curriculum row alone, from the equations: [e(x), <bot>, ẽ_1..ẽ_n, <eot>, e(tail)], each thought from a
    full uncached pass; loss_sum over the supervised tail. Returns (loss_sum, n supervised, thoughts (n, H))."""
    ids, labels = feat["input_ids"], feat["labels"]
    n = ids.count(S)
    first = next(j for j, y in enumerate(labels) if y != IGNORE_INDEX)
    prompt, tail = torch.tensor(ids[: first - n]), torch.tensor(ids[first:])
    E = model.generator.get_input_embeddings().weight
    seq = torch.cat([E[prompt], model.markers[0][None]])[None]
    thoughts = []
    for _ in range(n):
        e = _states(model, seq)[:, -1]
        thoughts.append(e[0])
        seq = torch.cat([seq, e[:, None]], 1)
    seq = torch.cat([seq, model.markers[1][None, None]], 1)
    full = torch.cat([seq, E[tail][None]], 1)
    logits = model.generator.lm_head(_states(model, full))[0, seq.shape[1] - 1: -1]
    return F.cross_entropy(logits, tail, reduction="sum"), len(tail), thoughts


def test_a_mixed_stage_batch_equals_each_row_alone_and_supervises_reasoning_and_response_only():
    model = CoconutModel(tiny_lm("llama", seed=1), _cfg(latents=2, stages=2)).eval()
    steps = [[30, 31, 32], [40, 41]]
    feats = [curriculum_feature([5, 6, 7, 8], steps, [20, 21, 2], 0, 2, False),     # 0 thoughts, all reasoning
             curriculum_feature([9, 10], steps, [22, 2], 1, 2, False),               # 2 thoughts, second step
             curriculum_feature([11, 12, 13], steps, [23, 24, 25, 2], 2, 2, True)]   # 4 thoughts, no reasoning
    b = collate(feats, 0, padding_side="right")
    out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert out.thoughts.shape == (3, 4, 32)
    assert int(out.n_tokens) == (5 + 3) + (2 + 2) + 4                                # remaining reasoning + response
    ref_sum = 0
    for i, f in enumerate(feats):
        loss, n_sup, thoughts = _reference_row(model, f)
        ref_sum = ref_sum + loss
        n = len(thoughts)
        if n:
            torch.testing.assert_close(out.thoughts[i, 4 - n:], torch.stack(thoughts), rtol=1e-4, atol=1e-5)
        assert bool((out.thoughts[i, : 4 - n] == 0).all())                           # masked thought columns
        alone = collate([f], 0, padding_side="right")
        one = model(alone["input_ids"], attention_mask=alone["attention_mask"], labels=alone["labels"])
        assert int(one.n_tokens) == n_sup
        torch.testing.assert_close(one.loss_sum, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_sum, ref_sum, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for g, w in zip(torch.autograd.grad(out.loss_sum, params), torch.autograd.grad(ref_sum, params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_slots_out_of_place_are_refused():
    ids = torch.tensor([[5, S, 6, 7]])
    with pytest.raises(ValueError, match="latent slots"):
        take_latent_slots(ids, torch.ones_like(ids))
    got_ids, got_mask, n = take_latent_slots(torch.tensor([[0, 5, 6, S, S], [7, 8, 9, 10, S]]),
                                             torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert n.tolist() == [2, 1]
    assert got_ids.tolist() == [[0, 0, 5, 6], [7, 8, 9, 10]] and got_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


# ------------------------------------------------------------------------------------------------------------------
# the trainer's order, a short fit, save/load

def test_the_trainer_takes_the_stages_in_order_each_epoch():
    stages = [0, 1, 2] * 4                                                           # features not sorted by stage
    args = TrainArgs(out_dir="unused", batch_size=2, grad_accum=2)
    for epoch in (0, 1):
        order = [i for win in windows_for_epoch(12, epoch, args, 1, stages) for micro in win for i in micro]
        assert sorted(order) == list(range(12)) and [stages[i] for i in order] == sorted(stages)
    plain = [i for win in windows_for_epoch(12, 0, args, 1) for m in win for i in m]
    assert [stages[i] for i in plain] != sorted(stages)                              # without stages: shuffled


def test_a_short_fit_with_the_curriculum_saves_and_loads(tokenizer, tmp_path):
    cfg = _cfg(latents=1, stages=2)
    method = Coconut()
    feats = method.features(_examples(2), tokenizer, DATA, args=_args(cfg))
    model = method.from_lms(tiny_lm("llama", seed=1, max_positions=1024), None, _args(cfg), tokenizer)
    args = TrainArgs(out_dir=str(tmp_path / "run"), batch_size=2, grad_accum=1, lr_generator=1e-2, epochs=1,
                     warmup_ratio=0.0, schedule="constant", progress=False, save_final=True)
    res = fit(model, feats, args, tokenizer.pad_token_id)
    assert res.steps == 3 and all(math.isfinite(x) for x in res.losses)           # one window per stage
    meta = json.loads((res.final_dir / "flythinker.json").read_text())
    assert meta["coconut"]["curriculum"] is True and meta["coconut"]["stages"] == 2
    loaded = Coconut().load(res.final_dir).eval()
    assert loaded.config == cfg and loaded.n_thoughts == 2                           # the last stage's K·c
    assert torch.equal(loaded.markers, model.markers)
    ids = torch.tensor([encode_example(_examples(1)[0], tokenizer, DATA, with_response=False)["prompt_ids"]])
    new = loaded.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(new, model.eval().generate(ids, max_new_tokens=4, eos_token_id=[]))
    assert loaded.last_generation_extras == [{"latent_steps": 2, "generated_tokens": 4}]
