"""Coconut: the latent chain and loss of the cached, batched forward against an uncached per-row reference
(gradients included), cached batched decoding against an uncached reference loop, padding invariance, save/load,
training through `fit` (and its resume), the runner end to end, and the cost extras."""

import json

import pytest
import torch
import torch.nn.functional as F

import flythinker.methods
from flythinker.data.collate import collate
from flythinker.methods import ModelArgs
from flythinker.methods.coconut import Coconut, CoconutConfig, CoconutModel, generated_counts, split_prompt_response
from flythinker.testing import tiny_lm, tiny_tokenizer
from flythinker.training.config import TrainArgs
from flythinker.training.loop import fit, validate
from flythinker.utils import UserError

V = 384


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(flythinker.methods.METHODS, "coconut", Coconut())


def _model(latents=3, rescale=False, seed=1):
    return CoconutModel(tiny_lm("llama", seed=seed), CoconutConfig(latents=latents, rescale=rescale)).eval()


def _features(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        p, r = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
        ids = torch.randint(3, V, (p + r,), generator=g).tolist()
        feats.append({"prompt_ids": ids[:p], "response_ids": ids[p:] + [2]})
    return feats


# ------------------------------------------------------------------------------------------------------------------
# uncached references, written from the equations (whole sequence re-run every time, no cache, no padding helpers)

def _states(model, embeds, mask):
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return model.generator.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state


def _thought(model, h):
    if model.config.rescale:
        target = model.generator.get_input_embeddings().weight.detach().norm(dim=-1).mean()  # a scale, no gradient
        h = h * (target / h.norm(dim=-1, keepdim=True))
    return h


def _reference_prefix(model, ids, mask, detach=False):
    """[e(x), <bot>, ẽ_1..ẽ_c, <eot>] for a left-padded prompt batch, each thought from a full uncached pass
    (`detach`: cut the gradient through the thoughts)."""
    B = ids.shape[0]
    E = model.generator.get_input_embeddings().weight
    seq = torch.cat([E[ids], model.markers[0].expand(B, 1, -1)], 1)
    m = torch.cat([mask, mask.new_ones(B, 1)], 1)
    thoughts = []
    for _ in range(model.config.latents):
        e = _thought(model, _states(model, seq, m)[:, -1])
        e = e.detach() if detach else e
        thoughts.append(e)
        seq, m = torch.cat([seq, e[:, None]], 1), torch.cat([m, m.new_ones(B, 1)], 1)
    seq, m = torch.cat([seq, model.markers[1].expand(B, 1, -1)], 1), torch.cat([m, m.new_ones(B, 1)], 1)
    return seq, m, thoughts


@torch.no_grad()
def _reference_decode(model, ids, mask, n):
    seq, m, _ = _reference_prefix(model, ids, mask)
    E = model.generator.get_input_embeddings().weight
    out = []
    for _ in range(n):
        y = model.generator.lm_head(_states(model, seq, m)[:, -1]).argmax(-1)
        out.append(y)
        seq, m = torch.cat([seq, E[y][:, None]], 1), torch.cat([m, m.new_ones(m.shape[0], 1)], 1)
    return torch.stack(out, 1)


def _reference_loss(model, feat, detach=False):
    """One row alone: loss_sum of the response given [prompt, <bot>, thoughts, <eot>] in one full pass."""
    p, r = torch.tensor([feat["prompt_ids"]]), torch.tensor([feat["response_ids"]])
    seq, _, thoughts = _reference_prefix(model, p, torch.ones_like(p), detach)
    E = model.generator.get_input_embeddings().weight
    full = torch.cat([seq, E[r]], 1)
    logits = model.generator.lm_head(_states(model, full, torch.ones(1, full.shape[1], dtype=torch.long)))
    pred = logits[0, seq.shape[1] - 1: -1]                                # <eot> .. y_{R-1} predict y_1 .. y_R
    thoughts = torch.stack(thoughts, 1)[0] if thoughts else full.new_zeros(0, full.shape[-1])
    return F.cross_entropy(pred, r[0], reduction="sum"), thoughts


# ------------------------------------------------------------------------------------------------------------------
# training forward

def test_split_repads_prompts_left_and_responses_right():
    b = collate([{"prompt_ids": [5, 6, 7], "response_ids": [8, 2]}, {"prompt_ids": [5], "response_ids": [9, 9, 2]}],
                0, padding_side="right")
    pr = split_prompt_response(b["input_ids"], b["attention_mask"], b["response_mask"], b["labels"])
    assert pr.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 5]] and pr.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pr.response_ids.tolist() == [[8, 2, 0], [9, 9, 2]]
    assert pr.targets.tolist() == [[8, 2, -100], [9, 9, 2]]
    left = collate([{"prompt_ids": [5, 6, 7], "response_ids": [8, 2]}, {"prompt_ids": [5], "response_ids": [9, 2]}],
                   0, padding_side="left")
    pl = split_prompt_response(left["input_ids"], left["attention_mask"], left["response_mask"])
    assert pl.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 5]] and pl.response_ids.tolist() == [[8, 2], [9, 2]]
    holes = b["response_mask"].clone()
    holes[0, 1] = 1                                                       # a "response" token inside the prompt
    with pytest.raises(ValueError, match="prompt response"):
        split_prompt_response(b["input_ids"], b["attention_mask"], holes)


@pytest.mark.parametrize("latents,rescale", [(3, False), (2, True), (1, False), (0, False)])
def test_batched_forward_equals_uncached_reference_per_row(latents, rescale):
    """Right-padded batch of different prompt and response lengths: thoughts, loss and n_tokens equal the rows
    computed alone by the uncached reference, and so do the gradients (they flow through the latent chain)."""
    model = _model(latents, rescale)
    feats = _features(3)
    b = collate(feats, 0, padding_side="right")
    out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert out.thoughts.shape == (3, latents, 32)
    assert int(out.n_tokens) == sum(len(f["response_ids"]) for f in feats)
    assert out.logits.shape == (3, 1 + max(len(f["response_ids"]) for f in feats), V)
    ref_sum = 0
    for i, f in enumerate(feats):
        loss, thoughts = _reference_loss(model, f)
        ref_sum = ref_sum + loss
        torch.testing.assert_close(out.thoughts[i], thoughts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss_sum, ref_sum, rtol=1e-5, atol=1e-5)
    alone = collate(feats[:1], 0, padding_side="right")                  # no padding: the mask-free path
    torch.testing.assert_close(model(alone["input_ids"], labels=alone["labels"]).loss_sum,
                               _reference_loss(model, feats[0])[0], rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss_sum, params)
    want = torch.autograd.grad(ref_sum, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    if latents:   # what matched includes the gradient through the chain: without it the gradients differ
        cut = torch.autograd.grad(sum(_reference_loss(model, f, detach=True)[0] for f in feats), params)
        assert max(float((g - c).abs().max()) for g, c in zip(got, cut)) > 1e-2


def test_latent_pass_equals_a_manual_loop_over_the_cache():
    """`think` = prompt + <bot> pass, then one position per thought: the thoughts equal a hand-written loop."""
    from flythinker.hf import new_cache

    model = _model(4)
    ids = torch.randint(3, V, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    _, _, ref = _reference_prefix(model, ids, mask)
    with torch.no_grad():
        head = torch.cat([model.embed(ids), model.marker(0, 2)], 1)
        m_full = torch.cat([mask, mask.new_ones(2, 6)], 1)
        pos = (m_full.cumsum(-1) - 1).clamp(min=0)
        thoughts, _ = model.think(head, model.marker(1, 2), m_full, pos, new_cache(model.generator))
    torch.testing.assert_close(thoughts, torch.stack(ref, 1), rtol=1e-4, atol=1e-5)


def test_forward_needs_to_know_where_the_response_is():
    model = _model()
    with pytest.raises(ValueError, match="labels or response_mask"):
        model(torch.randint(3, V, (1, 6)))


# ------------------------------------------------------------------------------------------------------------------
# decoding

@pytest.mark.parametrize("latents,rescale", [(3, False), (2, True), (0, False)])
def test_cached_batched_decode_equals_uncached_reference(latents, rescale):
    model = _model(latents, rescale)
    ids = torch.randint(3, V, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    new = model.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=[])
    assert torch.equal(new, _reference_decode(model, ids, mask, 7))


def test_each_row_of_a_left_padded_batch_equals_its_prompt_alone():
    model = _model(3, rescale=True)
    prompts = [torch.randint(3, V, (n,)).tolist() for n in (6, 3, 9)]
    b = collate([{"prompt_ids": p} for p in prompts], 0)
    batched = model.generate(b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=6, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=6, eos_token_id=[])
        assert torch.equal(batched[i], alone[0])


def test_generation_extras_count_latent_steps_and_tokens_per_row():
    model = _model(3)
    ids = torch.randint(3, V, (2, 5))
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert model.last_generation_extras == [{"latent_steps": 3, "generated_tokens": 6}] * 2
    stop = int(free[0, 2])                                                 # row 0 stops at its third token
    new = model.generate(ids, max_new_tokens=6, eos_token_id=[stop], pad_token_id=0)
    counts = generated_counts(new, [stop])
    assert counts[0] <= 3 and [e["generated_tokens"] for e in model.last_generation_extras] == counts
    assert generated_counts(torch.tensor([[4, 2, 0], [4, 4, 4]]), [2]) == [2, 3]


def test_context_limit_counts_the_thought_positions():
    model = CoconutModel(tiny_lm("llama", seed=1, max_positions=16), CoconutConfig(latents=4))
    with pytest.raises(ValueError, match="thought positions"):
        model.generate(torch.randint(3, V, (1, 8)), max_new_tokens=4)     # 8 + 6 + 4 > 16 (8 + 4 alone fits)


# ------------------------------------------------------------------------------------------------------------------
# persistence, training, the runner

def test_save_load_round_trip_and_checkpoint_checks(tmp_path):
    from flythinker.inference import checkpoint_fingerprint, validate_checkpoint
    from flythinker.methods.sft import SFT
    from flythinker.training.checkpoint import check_checkpoint_files

    model = _model(2, rescale=True)
    with torch.no_grad():
        model.markers.add_(0.5)                                            # not the fresh initialisation
    model.tokenizer = tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "flythinker.json").read_text())
    assert meta["method"] == "coconut" and meta["coconut"] == {"latents": 2, "rescale": True}
    loaded = Coconut().load(tmp_path / "m").eval()
    assert loaded.config == model.config and loaded.tokenizer is not None
    assert torch.equal(loaded.markers, model.markers)
    ids = torch.randint(3, V, (2, 6))
    assert torch.equal(loaded.generate(ids, max_new_tokens=5, eos_token_id=[]),
                       model.generate(ids, max_new_tokens=5, eos_token_id=[]))
    check_checkpoint_files(tmp_path / "m")                                 # what a resume checks
    validate_checkpoint(tmp_path / "m")                                    # what generate checks
    before = checkpoint_fingerprint(tmp_path / "m")
    with torch.no_grad():
        model.markers.add_(1.0)
    model.save_pretrained(tmp_path / "m")
    assert checkpoint_fingerprint(tmp_path / "m") != before                # the markers are in the digest
    sft = SFT().from_lms(tiny_lm("llama", seed=1), None, ModelArgs(method="sft"))
    sft.save_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match="not coconut"):
        Coconut().load(tmp_path / "sft")
    (tmp_path / "m" / "generator" / "latent_markers.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="latent_markers"):
        Coconut().load(tmp_path / "m")


def test_config_is_validated_and_read_from_model_args():
    from flythinker.config import ConfigError

    for bad in ({"latents": -1}, {"latents": 1.5}, {"latents": True}, {"rescale": "yes"}):
        with pytest.raises(ConfigError):
            CoconutConfig(**bad)
    args = ModelArgs(method="coconut")
    assert Coconut.settings(args) == CoconutConfig()                       # ModelArgs without a coconut section
    object.__setattr__(args, "coconut", CoconutConfig(latents=1))
    assert Coconut().from_lms(tiny_lm("llama", seed=1), None, args).config.latents == 1
    with pytest.raises(UserError, match="gradient_checkpointing"):
        Coconut().from_lms(tiny_lm("llama", seed=1), None, ModelArgs(method="coconut", gradient_checkpointing=True))
    assert Coconut().model_args(ModelArgs(method="sft")).method == "coconut"


def _train_args(tmp_path, **kw):
    base = {"out_dir": str(tmp_path / "run"), "batch_size": 2, "grad_accum": 1, "lr_generator": 1e-2,
            "warmup_ratio": 0.0, "schedule": "constant", "progress": False, "save_final": False}
    base.update(kw)
    return TrainArgs(**base)


def _fresh():
    return Coconut().from_lms(tiny_lm("llama", seed=1), None, ModelArgs(method="coconut"))


def test_fit_lowers_the_loss_and_trains_the_markers(tmp_path):
    model = _fresh()
    feats = _features(2)
    markers = model.markers.detach().clone()
    loss0 = validate(model, feats, 0)
    res = fit(model, feats, _train_args(tmp_path, max_steps=6), pad_token_id=0)
    assert res.losses[-1] < res.losses[0] and validate(model, feats, 0) < loss0 - 0.5
    assert not torch.equal(model.markers, markers)
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert "lr_generator" in log and "grad_norm_generator" in log


def test_fit_resume_is_exact(tmp_path):
    feats = _features(4)
    straight = fit(_fresh(), feats, _train_args(tmp_path / "s", max_steps=3), pad_token_id=0)
    args = _train_args(tmp_path / "r", max_steps=2, save_every=2)
    first = fit(_fresh(), feats, args, pad_token_id=0)
    second = fit(_fresh(), feats, TrainArgs(**{**args.__dict__, "max_steps": 3, "resume": True}), pad_token_id=0)
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)


def test_run_method_trains_and_writes_predictions_with_extras(tmp_path, monkeypatch):
    from flythinker.data import DataConfig, load_examples
    from flythinker.decoding.sampling import DecodeConfig
    from flythinker.experiments.runner import MethodSpec, run_method
    from flythinker.experiments.synthetic.generator import make_demo_dataset

    tok = tiny_tokenizer()

    class TinyCoconut(Coconut):
        def build(self, args):
            return self.from_lms(tiny_lm("llama", seed=1), None, args, tok), tok

    monkeypatch.setitem(flythinker.methods.METHODS, "coconut", TinyCoconut())
    rows = make_demo_dataset(n_users_train=2, n_users_test=1, items_per_user=6, seed=0)["user/train"][:3]
    p = tmp_path / "ex.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(p)
    data = DataConfig(k=1, profile_tokens=48, query_tokens=24, target_tokens=12, min_item_tokens=8)
    res = run_method(MethodSpec("Coconut", "coconut"), examples[:2], examples[2:], ModelArgs(method="coconut"), data,
                     _train_args(tmp_path, max_steps=2, save_final=True), DecodeConfig(max_new_tokens=4, batch_size=1),
                     tmp_path / "out", progress=False, log=lambda *a: None)
    assert res.train_steps == 2
    lines = [json.loads(x) for x in res.predictions.read_text().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0]["method"] == "Coconut" and isinstance(lines[0]["prediction"], str)
    extra = lines[0]["extra"]
    assert extra["latent_steps"] == 4 and 1 <= extra["generated_tokens"] <= 4
    final = tmp_path / "out" / "Coconut" / "train" / "final"
    assert isinstance(Coconut().load(final), CoconutModel)
