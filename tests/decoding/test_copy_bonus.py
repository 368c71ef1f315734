"""The history copy bonus (`DecodeConfig.copy_bonus`, `HistoryCopyBonus`): exactly the tokens that continue a
prompt n-gram get the bonus, once each; nothing before the response has n - 1 tokens; padding never matches; a
large bonus makes greedy decoding follow the prompt's spans whatever `penalty_scope` hides; a padded row decodes
as alone; the continuous batcher honours it per row; off, it builds nothing and leaves fingerprints as before."""

from __future__ import annotations

import pytest
import torch

from flythinker import FlyThinker, FlyThinkerConfig
from flythinker.decoding.sampling import NO_TOKEN, DecodeConfig, HistoryCopyBonus, build_logits_processor
from flythinker.inference import decode_fingerprint

from .test_loop import V, _lm, _prompts
from .test_processors import _run_rows

N = 12


@pytest.fixture(scope="module")
def models():
    return _lm(1), _lm(2, num_layers=1)


def test_the_tokens_that_continue_a_prompt_ngram_get_the_bonus_once():
    prompt = torch.tensor([[NO_TOKEN, 5, 6, 7, 5, 6, 9, 5, 6, 7]])       # (5, 6) -> 7 twice, 9 once
    proc = HistoryCopyBonus(prompt, n=3, bonus=2.0)
    scores = torch.zeros(1, 12)
    ids = torch.cat([prompt, torch.tensor([[4, 5, 6]])], dim=1)         # the response ends with (5, 6)
    out = proc(ids, scores)
    expected = torch.zeros(1, 12)
    expected[0, [7, 9]] = 2.0
    assert torch.equal(out, expected)
    # fewer than n - 1 response tokens: the prompt's own end (5, 6, 7 | 5) proposes nothing
    assert torch.equal(proc(torch.cat([prompt, torch.tensor([[5]])], dim=1), scores), scores)
    # a suffix the prompt does not hold, and padding, propose nothing; -inf stays -inf
    assert torch.equal(proc(torch.cat([prompt, torch.tensor([[6, 5]])], dim=1), scores), scores)
    banned = torch.zeros(1, 12)
    banned[0, 7] = float("-inf")
    assert proc(ids, banned)[0, 7] == float("-inf") and proc(ids, banned)[0, 9] == 2.0


def test_padding_in_the_prompt_never_matches_or_proposes():
    prompt = torch.tensor([[NO_TOKEN, NO_TOKEN, NO_TOKEN, 3, 4]])
    proc = HistoryCopyBonus(prompt, n=2, bonus=1.0)
    width = 6  # apply_processors' scores: V real columns and the spare one padding ids are clamped to
    ids = torch.cat([prompt.clamp(max=width - 1), torch.tensor([[width - 1]])], dim=1)
    assert torch.equal(proc(ids, torch.zeros(1, width)), torch.zeros(1, width))
    ids = torch.cat([prompt.clamp(max=width - 1), torch.tensor([[3]])], dim=1)
    assert proc(ids, torch.zeros(1, width)).tolist() == [[0, 0, 0, 0, 1.0, 0]]


def _follows_prompt(prompt: list[int], out: list[int], n: int) -> int:
    """How many tokens of `out` (from its (n-1)th on) continue an n-gram of the prompt whose first n - 1 tokens
    end the output so far; -1 when some position had a proposal and took another token."""
    followed = 0
    for t in range(n - 1, len(out)):
        ctx = tuple(out[t - n + 1: t])
        proposals = {prompt[j + n - 1] for j in range(len(prompt) - n + 1) if tuple(prompt[j: j + n - 1]) == ctx}
        if proposals:
            if out[t] not in proposals:
                return -1
            followed += 1
    return followed


@pytest.mark.parametrize("kind", ["sft", "flythinker"])
def test_a_large_bonus_makes_greedy_follow_the_prompt_spans(models, kind):
    model = FlyThinker(models[0], None) if kind == "sft" else FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    # long random prompts hold much of the vocabulary, so with n = 2 many tokens have a proposal to follow
    ids, mask = _prompts((200, 150), seed=5)
    plain = model.generate(ids, mask, max_new_tokens=N, eos_token_id=[])
    for scope in ("all", "response"):
        out = model.generate(ids, mask, max_new_tokens=N, eos_token_id=[], copy_bonus=1e4, copy_ngram=2,
                             penalty_scope=scope)
        for b in range(2):
            prompt = ids[b][mask[b] == 1].tolist()
            assert _follows_prompt(prompt, out[b].tolist(), 2) > 0, (scope, b)  # > 0: followed, -1: not
        assert not torch.equal(out, plain)
    # the bonus at 0 is off: the plain output
    assert torch.equal(model.generate(ids, mask, max_new_tokens=N, eos_token_id=[], copy_bonus=0.0), plain)


def test_a_padded_row_with_the_bonus_decodes_as_alone(models):
    model = FlyThinker(models[0], None)
    ids, mask = _prompts((9, 5), seed=2)
    kw = {"max_new_tokens": N, "eos_token_id": [], "copy_bonus": 3.0, "no_repeat_ngram_size": 2,
          "penalty_scope": "response"}
    batch = model.generate(ids, mask, **kw)
    short = ids[1:, -5:]
    assert batch[1].tolist() == model.generate(short, torch.ones_like(short), **kw)[0].tolist()


def test_continuous_rows_honour_the_bonus(models):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, _ = _prompts((7, 5), seed=4)
    p = [ids[i: i + 1, ids.shape[1] - n:] for i, n in enumerate((7, 5))]
    rows = {"a": (p[0], 10, {"do_sample": False, "copy_bonus": 5.0}),
            "b": (p[1], 8, {"do_sample": False})}
    mixed = _run_rows(model, {0: [("a", *rows["a"])], 2: [("b", *rows["b"])]})
    for name, (prompt, n, settings) in rows.items():
        solo = model.generate(prompt, torch.ones_like(prompt), max_new_tokens=n, eos_token_id=[], **settings)
        assert mixed[name] == solo[0].tolist(), name


def test_off_it_builds_nothing_and_keeps_fingerprints_and_bad_values_are_one_line_errors():
    assert len(build_logits_processor(DecodeConfig())) == 0 and not DecodeConfig().uses_history
    on = DecodeConfig(copy_bonus=2.0)
    assert on.uses_history
    with pytest.raises(ValueError, match="copy_bonus needs the prompts"):
        build_logits_processor(on)
    assert len(build_logits_processor(on, prompt_ids=torch.tensor([[1, 2, 3]]))) == 1
    base = decode_fingerprint(DecodeConfig(max_new_tokens=8))
    assert decode_fingerprint(DecodeConfig(max_new_tokens=8, copy_ngram=5)) == base  # read only when on
    assert decode_fingerprint(DecodeConfig(max_new_tokens=8, copy_bonus=2.0)) != base
    assert decode_fingerprint(DecodeConfig(max_new_tokens=8, copy_bonus=2.0)) != decode_fingerprint(
        DecodeConfig(max_new_tokens=8, copy_bonus=2.0, copy_ngram=4))
    for field, value in (("copy_bonus", -1.0), ("copy_bonus", float("nan")), ("copy_bonus", True),
                         ("copy_ngram", 1), ("copy_ngram", 2.5)):
        with pytest.raises(ValueError, match=field) as e:
            DecodeConfig(**{field: value})
        assert "\n" not in str(e.value)


def test_the_predictor_and_the_generate_flags_carry_the_bonus(models):
    import argparse

    from flythinker.cli.generate import add_cli, decode_config
    from flythinker.inference import Predictor
    from flythinker.testing import tiny_tokenizer
    from flythinker.utils import UserError

    kw = Predictor(FlyThinker(models[0], None), tiny_tokenizer(), None,
                   DecodeConfig(copy_bonus=2.5, copy_ngram=4))._kwargs(seed=0)
    assert (kw["copy_bonus"], kw["copy_ngram"]) == (2.5, 4)
    parser = argparse.ArgumentParser()
    add_cli(parser)
    args = parser.parse_args(["--checkpoint", "c", "--data", "d", "--out", "o", "--copy-bonus", "3", "--copy-ngram", "4"])
    cfg = decode_config(args)
    assert (cfg.copy_bonus, cfg.copy_ngram) == (3.0, 4)
    with pytest.raises(UserError, match="copy_bonus"):
        decode_config(parser.parse_args(["--checkpoint", "c", "--data", "d", "--out", "o", "--copy-bonus", "-1"]))
