"""Continuous batching at the decode level (`flythinker.decoding.continuous`): rows that join a running batch
mid-decode, with prompts shorter and longer than the running cache, produce exactly their solo greedy tokens, for
FlyThinker (two KV caches, r_{t-1}) and SFT (the Generator's cache alone); rows leaving change nothing for the
others and the caches shrink back to the longest live row; a seeded sampled row draws as it does alone."""

from __future__ import annotations

import pytest
import torch

from flythinker.decoding.continuous import RowBatch, RowSampler, RowsUnsupported, unsupported_reason

from .conftest import scaled_tiny_model

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


def _cache_len(batch):
    return batch.stepper.state.T + batch.stepper.state.t


def _run_schedule(model, tok, schedule, concurrent="auto"):
    """schedule: {step: [(name, text, n_tokens), ...]}: rows joining before that step's sampling. Rows leave after
    their n tokens. Returns ({name: tokens}, cache lengths seen after each leave, rows live then)."""
    batch = RowBatch(model, concurrent=concurrent, room=4)
    sampler = RowSampler()
    live: list[tuple[str, int]] = []
    got: dict[str, list[int]] = {}
    logits = None
    shrink = []
    step = 0
    while step in schedule or live or any(k > step for k in schedule):
        for name, text, n in schedule.get(step, []):
            ids = _ids(tok, text)
            new = batch.add(ids, torch.ones_like(ids), room=2)
            logits = new if logits is None else torch.cat([logits, new])
            live.append((name, n))
            got[name] = []
            sampler.add({"do_sample": False}, new.device)
        step += 1
        if not live:
            continue
        tokens = sampler.sample(logits)
        for (name, _), t in zip(live, tokens.tolist()):
            got[name].append(t)
        keep = [i for i, (name, n) in enumerate(live) if len(got[name]) < n]
        if len(keep) < len(live):
            batch.keep(keep)
            sampler.keep(keep)
            live = [live[i] for i in keep]
            if not live:
                logits = None
                continue
            shrink.append((_cache_len(batch), [len(tok.encode(_text(schedule, nm))) + len(got[nm]) - 1
                                               for nm, _ in live]))
            tokens = tokens[keep]
        logits = batch.step(tokens)
    batch.close()
    return got, shrink


def _text(schedule, name):
    return next(t for rows in schedule.values() for n, t, _ in rows if n == name)


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
