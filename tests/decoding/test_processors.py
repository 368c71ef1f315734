"""Decoding that does not loop: the step's logits processing built from transformers' processors
(`build_logits_processor`). Greedy with a repetition penalty, no-repeat n-grams and min new tokens equals
transformers' own generate on a left-padded batch; a GenerationConfig gives the same as its kwargs; the defaults
build nothing; the seeded sampling path filters as transformers' warpers (and as the hand-written filter did);
padding never counts; the continuous batcher honours the settings per row; CoT's forced delimiter survives an
n-gram ban; bad values are one-line errors."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from flythinker import FlyThinker, FlyThinkerConfig
from flythinker.decoding import loop
from flythinker.decoding.continuous import RowSampler
from flythinker.decoding.sampling import (
    NO_TOKEN,
    DecodeConfig,
    apply_processors,
    build_logits_processor,
    sample_next_token,
)
from tests.serving.helpers import Join, run_schedule

from .test_loop import V, _lm, _prompts

N = 14
PAD = 0
ANTI = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}


@pytest.fixture(scope="module")
def models():
    return _lm(1), _lm(2, num_layers=1)


def _loops(row: list[int], n: int) -> bool:
    """True when some n-gram occurs twice in row."""
    grams = [tuple(row[i: i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


def _plain_eos(model, ids, mask):
    """An EOS id that plain greedy decoding emits early in row 0 (its third token), so min_new_tokens matters."""
    plain = model.generate(ids, mask, max_new_tokens=N, eos_token_id=[], pad_token_id=PAD)
    return int(plain[0, 2])


@pytest.mark.parametrize("settings", [
    {"repetition_penalty": 1.3},
    {"no_repeat_ngram_size": 2},
    {"min_new_tokens": 6},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 6},
    {"repetition_penalty": 0.7, "no_repeat_ngram_size": 3},
])
def test_greedy_with_processors_equals_transformers_generate(models, settings):
    gen = models[0]
    model = FlyThinker(gen, None)  # the plain Generator, as SFT decodes it
    ids, mask = _prompts((9, 5))
    eos = _plain_eos(model, ids, mask)
    kw = {"max_new_tokens": N, "eos_token_id": eos, "pad_token_id": PAD}
    ref = gen.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw, **settings)[:, ids.shape[1]:]
    ours = model.generate(ids, attention_mask=mask, **kw, **settings)
    assert torch.equal(ours, ref)
    plain = model.generate(ids, attention_mask=mask, **kw)
    assert not torch.equal(ours, plain)  # the settings changed the decode, so the comparison means something
    for row in ours.tolist():
        n = settings.get("min_new_tokens", 0)
        assert eos not in row[:n]
        if settings.get("no_repeat_ngram_size"):
            real = row[: row.index(eos) + 1] if eos in row else row
            assert not _loops(real, settings["no_repeat_ngram_size"])


def test_fusion_model_with_processors_matches_a_reference_loop(models):
    """FlyThinker's two-model step goes through the same processing: each token is the argmax of transformers'
    processors applied to the teacher-forced logits of prompt + tokens so far."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    model = FlyThinker(*models, FlyThinkerConfig(lam=0.7))
    ids, mask = _prompts((6,))
    out = model.generate(ids, mask, max_new_tokens=10, eos_token_id=[], concurrent="sequential", **ANTI)
    procs = [RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2)]
    seq = ids
    for t in range(out.shape[1]):
        with torch.no_grad():
            resp = torch.arange(seq.shape[1])[None] >= ids.shape[1]                         # generated positions
            logits = model(seq, torch.ones_like(seq), response_mask=resp).logits[:, -1].float()
        for p in procs:
            logits = p(seq, logits)
        top = logits.max(-1).values
        assert float(top - logits[0, out[0, t]]) <= 1e-4, t  # float ties allowed (cached vs full forward)
        seq = torch.cat([seq, out[:, t: t + 1]], 1)
    assert not _loops(torch.cat([ids, out], 1)[0].tolist(), 2)


def test_generation_config_gives_the_same_as_its_kwargs(models):
    from transformers import GenerationConfig

    gen = models[0]
    model = FlyThinker(gen, None)
    ids, mask = _prompts((9, 5))
    eos = _plain_eos(model, ids, mask)
    kw = {"max_new_tokens": N, "eos_token_id": eos, "pad_token_id": PAD, "min_new_tokens": 4, **ANTI}
    gc = GenerationConfig(do_sample=False, **kw)
    by_kwargs = model.generate(ids, mask, **kw)
    assert torch.equal(model.generate(ids, mask, generation_config=gc), by_kwargs)
    assert torch.equal(loop.generate(model, ids, mask, generation_config=gc), by_kwargs)
    assert torch.equal(torch.stack(list(model.stream(ids, mask, generation_config=gc)), 1), by_kwargs)
    assert torch.equal(gen.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, ids.shape[1]:],
                       by_kwargs)
    # kwargs override the GenerationConfig
    assert torch.equal(model.generate(ids, mask, generation_config=gc, no_repeat_ngram_size=0),
                       model.generate(ids, mask, **{**kw, "no_repeat_ngram_size": 0}))
    cfg = DecodeConfig.from_generation_config(GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95,
                                                               max_new_tokens=7, eos_token_id=[2, 5]), seed=3)
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed, cfg.max_new_tokens, cfg.eos_token_id) \
        == (True, 0.8, 0.95, 0, 3, 7, [2, 5])  # unset top_k stays off (not transformers' global 50)


def test_unsupported_generation_config_features_are_one_line_errors():
    from transformers import GenerationConfig

    for gc, name in ((GenerationConfig(num_beams=4), "num_beams"), (GenerationConfig(min_p=0.1), "min_p"),
                     (GenerationConfig(max_length=50), "max_length"),
                     (GenerationConfig(max_new_tokens=5, suppress_tokens=[3]), "suppress_tokens")):
        with pytest.raises(ValueError, match=name) as e:
            DecodeConfig.from_generation_config(gc)
        assert "\n" not in str(e.value)
    # max_length is what transformers ignores too once max_new_tokens is set (here, or by an override)
    assert DecodeConfig.from_generation_config(GenerationConfig(max_length=50, max_new_tokens=5)).max_new_tokens == 5
    assert DecodeConfig.from_generation_config(GenerationConfig(max_length=50), max_new_tokens=6).max_new_tokens == 6
    with pytest.raises(TypeError, match="unknown generation argument"):
        DecodeConfig.from_generation_config(GenerationConfig(), beams=2)
    with pytest.raises(ValueError, match="repetition_penalty"):
        DecodeConfig.from_generation_config(GenerationConfig(repetition_penalty=-1.0))


def test_defaults_build_no_processors_and_keep_todays_output(models, monkeypatch):
    from flythinker.decoding import sampling

    gen = models[0]
    model = FlyThinker(gen, None)
    ids, mask = _prompts((9, 5))
    kw = {"max_new_tokens": N, "eos_token_id": 7, "pad_token_id": PAD}

    def refuse(*a, **k):
        raise AssertionError("processors built for default settings")

    monkeypatch.setattr(loop, "build_logits_processor", refuse)
    monkeypatch.setattr(sampling, "build_logits_processor", refuse)
    ref = gen.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)[:, ids.shape[1]:]
    assert torch.equal(model.generate(ids, mask, **kw), ref)
    neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0}
    assert torch.equal(model.generate(ids, mask, **kw, **neutral), ref)
    sampled = model.generate(ids, mask, **kw, do_sample=True, temperature=0.8, top_p=0.95, seed=1)
    assert sampled.shape[0] == 2  # the plain sampling path builds nothing either


def _old_filter(logits, temperature, top_k, top_p):
    """The hand-written filter sample_next_token used before it ran transformers' warpers (today's output)."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        sorted_scores = sorted_scores.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return scores


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 0.95), (1.0, 50, 1.0), (0.7, 40, 0.9), (1.3, 0, 0.5)])
def test_sampling_filters_as_transformers_warpers(temperature, top_k, top_p):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0)) * 3
    hf = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
    if top_k:
        hf.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        hf.append(TopPLogitsWarper(top_p))
    want = hf(None, logits.clone())
    cfg = DecodeConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    procs = build_logits_processor(cfg)
    assert [type(p) for p in procs] == [type(p) for p in hf]  # transformers' order
    assert torch.equal(apply_processors(procs, torch.zeros(8, 0, dtype=torch.long), logits), want)
    assert torch.equal(torch.isinf(_old_filter(logits, temperature, top_k, top_p)), torch.isinf(want))
    for seed in (0, 1):
        draw = torch.multinomial(want.softmax(-1), 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        got = sample_next_token(logits, torch.Generator().manual_seed(seed), True, temperature, top_k, top_p)
        assert torch.equal(got, draw)


def test_seeded_sampling_with_processors_is_reproducible_and_matches_transformers(models):
    model = FlyThinker(models[0], None)
    ids, mask = _prompts((9, 5))
    kw = {"max_new_tokens": N, "eos_token_id": [], "do_sample": True, "temperature": 0.8, "top_p": 0.95, **ANTI}
    a = model.generate(ids, mask, seed=5, **kw)
    assert torch.equal(a, model.generate(ids, mask, seed=5, **kw))
    assert not torch.equal(a, model.generate(ids, mask, seed=6, **kw))
    for row in torch.cat([ids, a], 1).tolist():
        assert not _loops([t for t in row if t != 0], 2)
    # With torch's global RNG (no seed), transformers' generate draws from the same filtered distribution the same
    # way: token for token equal.
    kw = {**kw, "eos_token_id": 7, "pad_token_id": PAD}
    torch.manual_seed(11)
    ours = model.generate(ids, mask, **kw)
    torch.manual_seed(11)
    ref = models[0].generate(input_ids=ids, attention_mask=mask, top_k=0, **kw)[:, ids.shape[1]:]
    assert torch.equal(ours, ref)


def test_left_padding_counts_for_nothing():
    """The padding positions (NO_TOKEN) never complete an n-gram nor get penalised, even when the pad id itself
    (0 here) is generated; transformers' own generate would match the generated 0 against real pad ids."""
    cfg = DecodeConfig(repetition_penalty=1.5, no_repeat_ngram_size=2)
    procs = build_logits_processor(cfg)
    row = torch.tensor([[5, 9, 0, 5, 0]])
    padded = torch.cat([torch.full((1, 4), NO_TOKEN), row], 1)
    logits = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    alone = apply_processors(procs, row, logits)
    assert torch.equal(apply_processors(procs, padded, logits), alone)
    assert alone[0, 5] == float("-inf") and torch.isfinite(alone[0, 9])  # (0, 5) seen: 5 banned after a 0
    with_pad_ids = apply_processors(procs, torch.cat([torch.zeros(1, 4, dtype=torch.long), row], 1), logits)
    assert with_pad_ids[0, 0] == float("-inf") and torch.isfinite(alone[0, 0])  # what NO_TOKEN avoids


def test_a_padded_row_decodes_as_alone_whatever_its_padding_holds(models):
    """The loop writes padding as NO_TOKEN: even padding made of the very token the row picks first is neither
    penalised nor matched."""
    model = FlyThinker(models[0], None)
    ids, mask = _prompts((9, 4))
    short = ids[1:, -4:]
    alone = model.generate(short, torch.ones_like(short), max_new_tokens=N, eos_token_id=[], **ANTI)
    padded = ids.clone()
    padded[1, :5] = alone[0, 0]
    batch = model.generate(padded, mask, max_new_tokens=N, eos_token_id=[], **ANTI)
    assert batch[1].tolist() == alone[0].tolist()


def test_cot_forced_delimiter_survives_an_ngram_ban():
    """The closing delimiter (40, 41) is in the prompt, so the n-gram ban forbids the forced 41; the stepper's
    one-hot constraint wins (`apply_processors`), and the response follows as without the setting."""
    from tests.methods.test_cot import CLOSE, EOS, scripted

    model = scripted(cap=4)
    prompt = torch.tensor([[*CLOSE, 3, 15]])   # 15 -> 16 17 18 19, cap: forced 40 41, then 20 21 EOS
    kw = {"max_new_tokens": 8, "eos_token_id": [EOS], "pad_token_id": PAD}
    out = model.generate(prompt, **kw, no_repeat_ngram_size=2)
    assert out[0].tolist() == [20, 21, EOS]
    assert model.last_generation_extras[0]["reasoning_ids"] == [16, 17, 18, 19]
    assert model.last_generation_extras[0]["generated_tokens"] == 9
    from transformers import GenerationConfig  # CoT's own wrapper takes a GenerationConfig as well

    gc = GenerationConfig(max_new_tokens=8, no_repeat_ngram_size=2, eos_token_id=[EOS], pad_token_id=PAD)
    assert torch.equal(model.generate(prompt, generation_config=gc), out)


# ----------------------------------------------------------------------------------------------------------------
# the continuous batcher: settings per row


def _run_rows(model, schedule):
    """schedule: {step: [(name, prompt ids (1, T), n_tokens, settings)]}; returns {name: tokens}."""
    got, _ = run_schedule(model, {step: [Join(*row) for row in rows] for step, rows in schedule.items()},
                          eos_token_id=[])
    return got


@pytest.mark.parametrize("kind", ["sft", "flythinker"])
def test_continuous_rows_honour_their_own_settings(models, kind):
    model = FlyThinker(models[0], None) if kind == "sft" else FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, _ = _prompts((4, 9, 6, 5), seed=3)
    p = [ids[i: i + 1, ids.shape[1] - n:] for i, n in enumerate((4, 9, 6, 5))]
    rows = {
        "a": (p[0], 12, {"do_sample": False, "no_repeat_ngram_size": 2}),
        "b": (p[1], 9, {"do_sample": False}),
        "c": (p[2], 10, {"do_sample": False, "no_repeat_ngram_size": 3, "repetition_penalty": 1.2}),
        "d": (p[3], 8, {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "seed": 4, "no_repeat_ngram_size": 2}),
    }
    mixed = _run_rows(model, {0: [("a", *rows["a"])], 2: [("b", *rows["b"]), ("c", *rows["c"])],
                              3: [("d", *rows["d"])]})
    for name, (prompt, n, settings) in rows.items():
        solo = model.generate(prompt, torch.ones_like(prompt), max_new_tokens=n, eos_token_id=[], **settings)
        assert mixed[name] == solo[0].tolist(), name
        assert _run_rows(model, {0: [(name, prompt, n, settings)]})[name] == mixed[name], name
    plain = model.generate(p[0], torch.ones_like(p[0]), max_new_tokens=12, eos_token_id=[])
    assert plain[0].tolist() != mixed["a"]  # the per-row setting mattered
    assert not _loops(p[0][0].tolist() + mixed["a"], 2)


def test_row_sampler_needs_what_its_settings_read():
    s = RowSampler()
    with pytest.raises(ValueError, match="prompt_ids"):
        s.add({"no_repeat_ngram_size": 2}, torch.device("cpu"))
    with pytest.raises(ValueError, match="eos_token_id"):
        s.add({"min_new_tokens": 2}, torch.device("cpu"), prompt_ids=[3, 4])
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        s.add({"no_repeat_ngram_size": -1}, torch.device("cpu"), prompt_ids=[3, 4])
    s.add({"min_new_tokens": 2, "eos_token_id": 7}, torch.device("cpu"), prompt_ids=[3, 4])
    logits = torch.zeros(1, 10)
    logits[0, 7] = 5.0
    assert s.sample(logits).tolist() == [0] and s.sample(logits).tolist() == [0]  # EOS held back twice
    assert s.sample(logits).tolist() == [7]


# ----------------------------------------------------------------------------------------------------------------
# settings: validation, config files and flags, the run fingerprint


@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf), ("repetition_penalty", True), ("no_repeat_ngram_size", -1),
    ("no_repeat_ngram_size", 1.5), ("no_repeat_ngram_size", True), ("min_new_tokens", -2), ("min_new_tokens", "3"),
])
def test_bad_values_are_one_line_errors(models, field, value):
    with pytest.raises(ValueError, match=field) as e:
        DecodeConfig(**{field: value})
    assert "\n" not in str(e.value)
    ids, mask = _prompts((3,))
    with pytest.raises(ValueError, match=field):
        FlyThinker(models[0], None).generate(ids, mask, max_new_tokens=2, **{field: value})


def test_config_files_flags_and_fingerprint_carry_the_settings(tmp_path):
    from flythinker.config import add_dataclass_args, build_config
    from flythinker.experiments.study import StudyConfig
    from flythinker.inference import decode_fingerprint
    from flythinker.safeio import fingerprint

    yaml = tmp_path / "study.yaml"
    yaml.write_text("decode:\n  repetition_penalty: 1.2\n  no_repeat_ngram_size: 3\n")
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, StudyConfig)
    study = build_config(StudyConfig, parser.parse_args(["--decode.min_new_tokens", "5"]), str(yaml))
    assert (study.decode.repetition_penalty, study.decode.no_repeat_ngram_size, study.decode.min_new_tokens) \
        == (1.2, 3, 5)
    flags = build_config(StudyConfig, parser.parse_args(["--decode.repetition_penalty", "1.2"]))
    assert flags.decode.repetition_penalty == 1.2
    base = DecodeConfig(max_new_tokens=8)
    # unchanged for runs without the new settings (their old fingerprint, computed as before they existed)
    assert decode_fingerprint(base, "float32") == fingerprint(
        {"max_new_tokens": 8, "batch_size": 4, "dtype": "float32", "greedy": True, "eos_token_id": None,
         "pad_token_id": None})
    for change in ({"repetition_penalty": 1.2}, {"no_repeat_ngram_size": 3}, {"min_new_tokens": 2}):
        assert decode_fingerprint(DecodeConfig(max_new_tokens=8, **change), "float32") \
            != decode_fingerprint(base, "float32"), change


def test_the_predictor_passes_the_settings_to_generate(models):
    """The study and the generate verb decode through `Predictor`, whose generate kwargs carry the settings."""
    from flythinker.inference import Predictor
    from flythinker.testing import tiny_tokenizer

    decode = DecodeConfig(max_new_tokens=4, repetition_penalty=1.2, no_repeat_ngram_size=3, min_new_tokens=2)
    kw = Predictor(FlyThinker(models[0], None), tiny_tokenizer(), None, decode)._kwargs(seed=0)
    assert (kw["repetition_penalty"], kw["no_repeat_ngram_size"], kw["min_new_tokens"]) == (1.2, 3, 2)


def test_response_scope_penalizes_only_generated_tokens(models):
    """penalty_scope="response": the repetition penalty and the n-gram ban see the generated tokens only, so words
    of the prompt (a user's history) stay free to reuse. Equals a reference greedy loop that runs transformers'
    processors on the generated ids alone."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    gen = models[0]
    model = FlyThinker(gen, None)
    ids, mask = _prompts((10, 7))
    # Prompts that end with what plain greedy would write next, so "all" scope has prompt tokens to penalize.
    plain = model.generate(ids, mask, max_new_tokens=4, eos_token_id=[], pad_token_id=PAD)
    ids, mask = torch.cat([ids, plain], dim=1), torch.cat([mask, torch.ones_like(plain)], dim=1)
    out = model.generate(ids, mask, max_new_tokens=N, eos_token_id=[], pad_token_id=PAD,
                         penalty_scope="response", **ANTI)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(ANTI["repetition_penalty"]),
                                 NoRepeatNGramLogitsProcessor(ANTI["no_repeat_ngram_size"])])
    for b in range(ids.shape[0]):
        row = ids[b][mask[b] == 1][None]                                                 # (1, T_b)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(N):
                seq = torch.cat([row, torch.tensor([new], dtype=torch.long)], dim=1) if new else row
                logits = gen(seq).logits[:, -1].float()                                  # (1, V)
                if new:
                    logits = procs(torch.tensor([new]), logits)
                new.append(int(logits.argmax(-1)))
        assert out[b].tolist() == new
        assert not _loops(new, ANTI["no_repeat_ngram_size"])
    full = model.generate(ids, mask, max_new_tokens=N, eos_token_id=[], pad_token_id=PAD, **ANTI)
    assert not torch.equal(out, full)  # the prompt's tokens matter in "all" scope
    with pytest.raises(ValueError, match="penalty_scope"):
        DecodeConfig(penalty_scope="prompt")
