"""Continuous batching at the decode level (`flythinker.decoding.continuous`): rows that join a running batch
mid-decode, with prompts shorter and longer than the running cache, produce exactly their solo greedy tokens, for
FlyThinker (two KV caches, r_{t-1}) and SFT (the Generator's cache alone); rows leaving change nothing for the
others and the caches shrink back to the longest live row; a seeded sampled row draws as it does alone."""

from __future__ import annotations

import pytest
import torch

from flythinker.decoding.continuous import RowBatch, RowSampler, RowsUnsupported, unsupported_reason

from .conftest import scaled_tiny_model
from .helpers import Join, run_schedule

TEXTS = ["Write a review.", "Write a long and detailed review of the new album with warm melodies and honest lyrics.",
         "The songs.", "I loved this album because the melodies are warm.", "Overall, the sound is great."]


@pytest.fixture(scope="module")
def models():
    fly, tok = scaled_tiny_model()
    from flythinker import FlyThinker

    sft = FlyThinker(fly.generator, None, tokenizer=tok).eval()
    return {"flythinker": (fly, tok), "sft": (sft, tok)}


def _ids(tok, text):
    return torch.tensor([tok.encode(text)])


def _solo(model, ids, n, **kw):
    out = model.generate(ids, torch.ones_like(ids), max_new_tokens=n, eos_token_id=[], **kw)
    return out[0].tolist()


def _run_schedule(model, tok, schedule, concurrent="auto"):
    """schedule: {step: [(name, text, n_tokens), ...]}, greedy rows, driven by `helpers.run_schedule`."""
    return run_schedule(model, {step: [Join(name, _ids(tok, text), n) for name, text, n in rows]
                                for step, rows in schedule.items()}, concurrent=concurrent)


@pytest.mark.parametrize("kind", ["flythinker", "sft"])
def test_rows_joining_mid_decode_match_their_solo_tokens(models, kind):
    model, tok = models[kind]
    schedule = {
        0: [("a", TEXTS[0], 12)],
        3: [("b", TEXTS[1], 9), ("c", TEXTS[2], 14)],  # longer and shorter than the running cache, together
        5: [("d", TEXTS[3], 3)],                       # leaves first
        9: [("e", TEXTS[4], 6)],
    }
    got, shrink = _run_schedule(model, tok, schedule)
    for rows in schedule.values():
        for name, text, n in rows:
            assert got[name] == _solo(model, _ids(tok, text), n), name
    # after each leave the caches are exactly as long as the longest live row (padding columns cut)
    assert shrink and all(length == max(lens) for length, lens in shrink), shrink


def test_threads_backend_rows_join_and_leave(models):
    model, tok = models["flythinker"]
    schedule = {0: [("a", TEXTS[1], 8)], 2: [("b", TEXTS[0], 8)], 4: [("c", TEXTS[2], 3)]}
    got, _ = _run_schedule(model, tok, schedule, concurrent="threads")
    for rows in schedule.values():
        for name, text, n in rows:
            assert got[name] == _solo(model, _ids(tok, text), n, concurrent="threads"), name


def test_a_row_leaving_does_not_change_the_others(models):
    model, tok = models["flythinker"]
    together = {0: [("a", TEXTS[1], 10), ("b", TEXTS[0], 10), ("c", TEXTS[3], 10)]}
    early = {0: [("a", TEXTS[1], 10), ("b", TEXTS[0], 2), ("c", TEXTS[3], 10)]}
    g1, _ = _run_schedule(model, tok, together)
    g2, _ = _run_schedule(model, tok, early)
    assert g1["a"] == g2["a"] and g1["c"] == g2["c"] and g2["b"] == g1["b"][:2]


def test_buffers_grow_past_the_room_hint(models):
    model, tok = models["sft"]
    got, _ = _run_schedule(model, tok, {0: [("a", TEXTS[0], 20)], 1: [("b", TEXTS[2], 15)]})
    assert got["a"] == _solo(model, _ids(tok, TEXTS[0]), 20)
    assert got["b"] == _solo(model, _ids(tok, TEXTS[2]), 15)


def test_a_seeded_row_draws_as_it_does_alone(models):
    model, tok = models["flythinker"]
    ids = _ids(tok, TEXTS[3])
    alone = _solo(model, ids, 10, do_sample=True, temperature=1.0, top_p=0.9, seed=7)
    batch, sampler = RowBatch(model), RowSampler()
    other = _ids(tok, TEXTS[1])
    logits = batch.add(other, torch.ones_like(other))
    sampler.add({"do_sample": True, "temperature": 0.7}, logits.device)       # an unseeded neighbour
    for _ in range(2):
        logits = batch.step(sampler.sample(logits))
    logits = torch.cat([logits, batch.add(ids, torch.ones_like(ids))])
    sampler.add({"do_sample": True, "temperature": 1.0, "top_p": 0.9, "seed": 7}, logits.device)
    mine = []
    for _ in range(10):
        t = sampler.sample(logits)
        mine.append(int(t[1]))
        logits = batch.step(t)
    batch.close()
    assert mine == alone


def test_unsupported_models_are_named():
    class Odd:
        def parameters(self):
            return iter([torch.zeros(1)])

        def decoder(self, ids, mask, cfg):
            class S:
                device = torch.device("cpu")

                def close(self):
                    pass
            return S()

        def decode_lms(self):
            return []

    assert "does not support rows" in unsupported_reason(Odd())
    with pytest.raises(RowsUnsupported):
        RowBatch(Odd()).add(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long))


def test_supported_models_have_no_reason(models):
    assert unsupported_reason(models["flythinker"][0]) is None
    assert unsupported_reason(models["sft"][0]) is None
    assert unsupported_reason(models["sft"][0].generator) is not None  # a bare HF model has no decoder()


@pytest.fixture(scope="module")
def looping_sft():
    """An SFT model whose greedy text repeats n-grams (weights scaled less), so a ban changes it."""
    from flythinker import FlyThinker

    fly, tok = scaled_tiny_model(scale=0.1)
    return FlyThinker(fly.generator, None, tokenizer=tok).eval(), tok


@pytest.mark.parametrize("scope", ["all", "response"])
def test_a_rows_ban_does_not_leak_into_another_row(looping_sft, scope):
    """Row b's prompt holds row a's whole solo continuation, so if b's history (prompt, scope all) or b's tokens
    reached a's processors, a's n-gram ban would change a's tokens. Joining mid-decode or prefilled together
    (left-padded), each row writes exactly its solo tokens."""
    model, tok = looping_sft
    ban = {"do_sample": False, "no_repeat_ngram_size": 2, "repetition_penalty": 1.2, "penalty_scope": scope}
    a = _ids(tok, TEXTS[0])
    solo_a = _solo(model, a, 10, **ban)
    b = torch.cat([a, torch.tensor([solo_a])], dim=1)
    solo_b = _solo(model, b, 8, **ban)
    assert solo_a != _solo(model, a, 10)  # the ban changes a's text, so a leak could show
    for schedule in ({0: [Join("a", a, 10, ban)], 2: [Join("b", b, 8, ban)]},
                     {0: [Join("b", b, 8, ban), Join("a", a, 10, ban)]}):
        got, _ = run_schedule(model, schedule, eos_token_id=[])
        assert got == {"a": solo_a, "b": solo_b}, schedule


@pytest.fixture(scope="module")
def cos_model(models):
    from flythinker.methods.configs import CoSConfig
    from flythinker.methods.cos import CoSModel

    fly, tok = models["flythinker"]
    return CoSModel(fly.generator, CoSConfig(lam=1.5), tokenizer=tok).eval(), tok


def test_cos_rows_joining_mid_decode_match_their_solo_steered_tokens(cos_model):
    """CoS's two caches (with and without the history, of different lengths) are merged and compacted each on
    its own: rows joining and leaving write exactly what `CoSModel.generate` writes for them alone."""
    model, tok = cos_model
    rows = {"a": (TEXTS[1], TEXTS[0], 12), "b": (TEXTS[0], TEXTS[2], 6), "c": (TEXTS[3], TEXTS[4], 9),
            "d": (TEXTS[4], TEXTS[1], 5)}  # name: (prompt with history, prompt without, tokens)

    def join(name, settings=None):
        ctx, plain, n = rows[name]
        p = _ids(tok, plain)
        return Join(name, _ids(tok, ctx), n, settings, {"plain_input_ids": p, "plain_attention_mask": torch.ones_like(p)})

    def solo(name, **kw):
        ctx, plain, n = rows[name]
        p = _ids(tok, plain)
        return model.generate(_ids(tok, ctx), plain_input_ids=p, max_new_tokens=n, eos_token_id=[], **kw)[0].tolist()

    ban = {"do_sample": False, "no_repeat_ngram_size": 2}
    got, _ = run_schedule(model, {0: [join("a")], 2: [join("b"), join("c", ban)], 4: [join("d")]}, eos_token_id=[])
    assert got == {"a": solo("a"), "b": solo("b"), "c": solo("c", **ban), "d": solo("d")}
    unsteered = model.generate(_ids(tok, rows["a"][0]), max_new_tokens=12, eos_token_id=[],
                               plain_input_ids=_ids(tok, rows["a"][0]))[0].tolist()
    assert got["a"] != unsteered  # the history-free prompt reached the decode
    assert unsupported_reason(model) is None
