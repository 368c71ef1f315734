"""NextQuill: the token weights and the loss against hand computations, the packed training row and its split, the
forward against per-row passes, the reductions to SFT, the trainer, save/load."""

import dataclasses
import json
import math

import pytest
import torch

from flythinker import FlyThinker
from flythinker.data import DataConfig, Example, collate
from flythinker.data.collate import IGNORE_INDEX, encode_example
from flythinker.methods import METHODS, ModelArgs
from flythinker.methods.configs import NextQuillConfig
from flythinker.methods.nextquill import NextQuill, NextQuillModel, nextquill_loss, split_packed, token_weights
from flythinker.testing import tiny_lm

DATA = DataConfig(k=2, profile_tokens=64, min_item_tokens=16, query_tokens=24, target_tokens=12, system_prompt="")
CFG = NextQuillConfig(threshold=0.05, high=0.9, low=0.1, alpha=0.1)


def _examples(n=3):
    out = []
    for i in range(n):
        items = [{"text": f"I loved this album {j}, the melodies are warm" + "!" * (i + j)} for j in range(i + 1)]
        out.append(Example(id=f"e{i}", user_id=f"u{i}", input=f"Write the review of album {i}",
                           output="I loved this album" + ", the sound is great" * i + ".", profile=items,
                           task="generic"))
    return out


def test_token_weights_equal_a_hand_computation():
    p_h = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.6, 0.7]])
    p_0 = torch.tensor([[0.3, 0.18, 0.5], [0.2, 0.3, 0.1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w = token_weights(p_h.log(), p_0.log(), mask, CFG)
    # row 0: δ = 0.2, 0.02, 0.4 -> raw 0.9, 0.1, 0.9 (sum 1.9), rescaled to mean 1 over 3 tokens
    # row 1: δ = -0.1, 0.3 (third is padding) -> raw 0.1, 0.9 (sum 1.0), rescaled to mean 1 over 2 tokens
    hand = torch.tensor([[0.9 * 3 / 1.9, 0.1 * 3 / 1.9, 0.9 * 3 / 1.9], [0.1 * 2 / 1.0, 0.9 * 2 / 1.0, 0.0]])
    assert torch.allclose(w, hand, atol=1e-6)
    assert torch.allclose(w.sum(-1), mask.sum(-1).float())                     # Σ_t w_t = n: SFT's loss scale
    # low = 0 and nothing preference-bearing: the row falls back to uniform weights
    w0 = token_weights(p_0.log(), p_h.log(), mask, NextQuillConfig(low=0.0))  # δ swapped: row 1 keeps one token
    assert torch.allclose(w0[0], torch.ones(3)) and torch.allclose(w0[1], torch.tensor([2.0, 0.0, 0.0]))
    assert not w.requires_grad


def test_nextquill_loss_equals_a_hand_computation():
    z_h = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])                  # (B=1, N=2, V=3)
    z_0 = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    y = torch.tensor([[0, 1]])
    mask = torch.tensor([[1, 1]])

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    loss, nll, w = nextquill_loss(z_h, z_0, y, mask, CFG)
    ph = [softmax(z_h[0, t].tolist())[y[0, t]] for t in range(2)]
    p0 = [softmax(z_0[0, t].tolist())[y[0, t]] for t in range(2)]
    raw = [0.9 if a - b > 0.05 else 0.1 for a, b in zip(ph, p0)]
    weights = [r * 2 / sum(raw) for r in raw]
    ce = [-math.log(softmax((z_h[0, t] - z_0[0, t]).tolist())[y[0, t]]) for t in range(2)]
    hand = sum(wt * -math.log(p) for wt, p in zip(weights, ph)) + 0.1 * sum(ce)
    assert raw == [0.9, 0.1]                     # token 0 is preference-bearing, token 1 is not
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert nll.item() == pytest.approx(-math.log(ph[0]) - math.log(ph[1]), rel=1e-6)
    assert torch.allclose(w, torch.tensor([weights]))


def test_features_pack_both_prompts_and_split_back(tokenizer):
    examples = _examples()
    feats = NextQuill().features(examples, tokenizer, DATA)
    b = collate(feats, tokenizer.pad_token_id, padding_side="right")
    rows = split_packed(b["input_ids"], b["attention_mask"], b["labels"])
    plain = dataclasses.replace(DATA, retrieval="none", k=0)
    for i, ex in enumerate(examples):
        with_h = encode_example(ex, tokenizer, DATA)
        p_0 = encode_example(ex, tokenizer, plain, with_response=False)["prompt_ids"]
        r = with_h["response_ids"]
        assert rows.ids_h[i][rows.mask_h[i].bool()].tolist() == with_h["prompt_ids"] + r
        assert rows.ids_0[i][rows.mask_0[i].bool()].tolist() == p_0 + r
        assert int(rows.n[i]) == len(r) and int(rows.start_h[i]) == len(with_h["prompt_ids"]) - 1
        assert int(rows.start_0[i]) == len(p_0) - 1
        assert sum(x != IGNORE_INDEX for x in feats[i]["labels"]) == len(r)   # the trainer counts SFT's tokens
    sft = collate([encode_example(ex, tokenizer, DATA) for ex in examples], tokenizer.pad_token_id,
                  padding_side="right")
    with pytest.raises(ValueError, match="not a NextQuill training row"):
        split_packed(sft["input_ids"], sft["attention_mask"], sft["labels"])


def _row_by_row(lm, feats, cfg):
    """The NextQuill loss of packed features computed one example at a time, with explicit per-token Python."""
    total = 0.0
    for f in feats:
        ids, labels = f["input_ids"], f["labels"]
        sup = [j for j, x in enumerate(labels) if x != IGNORE_INDEX]
        n, end = len(sup), sup[-1]
        a, b = ids[: end + 1], ids[end + 1:]
        with torch.no_grad():
            z_a = lm(torch.tensor([a])).logits[0].double()
            z_b = lm(torch.tensor([b])).logits[0].double()
        ys = a[-n:]
        nll, ce, raw = [], [], []
        for t, y in enumerate(ys):
            za, zb = z_a[len(a) - n - 1 + t], z_b[len(b) - n - 1 + t]
            lp_a, lp_b = za.log_softmax(-1)[y].item(), zb.log_softmax(-1)[y].item()
            nll.append(-lp_a)
            ce.append(-(za - zb).log_softmax(-1)[y].item())
            raw.append(cfg.high if math.exp(lp_a) - math.exp(lp_b) > cfg.threshold else cfg.low)
        total += sum(r * n / sum(raw) * x for r, x in zip(raw, nll)) + cfg.alpha * sum(ce)
    return total


def test_forward_equals_per_example_passes_and_reduces_to_sft(tokenizer):
    lm = tiny_lm("llama", seed=5, max_positions=1024)
    examples = _examples()
    feats = NextQuill().features(examples, tokenizer, DATA)
    b = collate(feats, tokenizer.pad_token_id, padding_side="right")
    cfg = NextQuillConfig(threshold=0.0, high=0.9, low=0.1, alpha=0.3)        # threshold 0: some tokens each way
    model = NextQuillModel(lm, cfg).train()
    out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert out.loss_sum.item() == pytest.approx(_row_by_row(lm, feats, cfg), rel=1e-4)
    assert int(out.n_tokens) == int((b["labels"] != IGNORE_INDEX).sum())
    out.loss_sum.backward()
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)
    # uniform weights and no auxiliary term: exactly SFT's summed NLL on the with-history sequence
    sft = collate([encode_example(ex, tokenizer, DATA) for ex in examples], tokenizer.pad_token_id,
                  padding_side="right")
    ref = FlyThinker(lm, None)(sft["input_ids"], attention_mask=sft["attention_mask"], labels=sft["labels"])
    plain = NextQuillModel(lm, NextQuillConfig(high=1.0, low=1.0, alpha=0.0)).train()
    got = plain(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert got.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-5)
    # eval mode (validate's dev NLL): the plain pass over the packed row is SFT's NLL too
    ev = NextQuillModel(lm, cfg).eval()(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert ev.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-5)


def test_the_trainer_trains_it_and_it_saves_and_loads(tokenizer, tmp_path):
    from flythinker.inference import checkpoint_method, load_checkpoint, validate_checkpoint
    from flythinker.training.config import TrainArgs
    from flythinker.training.loop import fit

    feats = NextQuill().features(_examples(4), tokenizer, DATA)
    cfg = NextQuillConfig(alpha=0.2)
    model = METHODS["nextquill"].from_lms(tiny_lm("llama", seed=1, max_positions=1024), None,
                                          dataclasses.replace(ModelArgs(method="nextquill"), nextquill=cfg),
                                          tokenizer)
    args = TrainArgs(out_dir=str(tmp_path / "run"), batch_size=2, grad_accum=1, lr_generator=1e-2, max_steps=6,
                     warmup_ratio=0.0, schedule="constant", progress=False)
    res = fit(model, feats, args, tokenizer.pad_token_id)
    assert res.steps == 6 and all(math.isfinite(x) for x in res.losses) and res.losses[-1] < res.losses[0]
    final = res.final_dir
    validate_checkpoint(final)
    assert checkpoint_method(final) == "nextquill"
    meta = json.loads((final / "flythinker.json").read_text())
    assert meta["method"] == "nextquill" and meta["nextquill"]["config"]["alpha"] == 0.2
    loaded = NextQuill().load(final)
    assert isinstance(loaded, NextQuillModel) and loaded.nextquill == cfg
    ids = torch.tensor([encode_example(_examples(1)[0], tokenizer, DATA, with_response=False)["prompt_ids"]])
    kw = {"max_new_tokens": 4, "eos_token_id": [], "pad_token_id": tokenizer.pad_token_id}
    model.eval()
    assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))  # decodes as SFT
    assert isinstance(load_checkpoint(final, dtype="float32")[0], NextQuillModel)
    FlyThinker(tiny_lm("llama", seed=4), None, tokenizer=tokenizer).save_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match="no 'nextquill' section"):
        NextQuillModel.from_pretrained(tmp_path / "sft")


def test_settings_are_checked():
    from flythinker.config import ConfigError, from_dict

    assert from_dict(ModelArgs, {"method": "nextquill", "nextquill": {"alpha": 0}}).nextquill.alpha == 0.0
    for bad in ({"high": 0.1, "low": 0.5}, {"low": -1}, {"alpha": -0.1}, {"high": 0}, {"threshold": "x"}):
        with pytest.raises(ConfigError):
            from_dict(ModelArgs, {"method": "nextquill", "nextquill": bad})
