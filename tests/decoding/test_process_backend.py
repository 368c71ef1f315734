"""The "process" decode backend (the Reasoner in a worker process): the same tokens as sequential (greedy, padded,
seeded sampling, a width-mismatch projection), R's steps really run in the worker, the worker sees in-place weight
updates and re-receives replaced weights, a decode can switch backends mid-way (the cache comes back), "auto" can
choose it, the places that cannot use it refuse it in one line, and a dead worker is one clear error followed by a
fresh worker."""

import os

import pytest
import torch

from flythinker import FlyThinker, FlyThinkerConfig
from flythinker.config import ConfigError
from flythinker.decoding import calibrate, concurrency, remote
from flythinker.decoding.continuous import RowBatch
from flythinker.decoding.loop import generate
from flythinker.decoding.sampling import DecodeConfig
from flythinker.serving.config import ServeConfig

from .test_calibrate import FakeTimer, _entries, _stepper
from .test_loop import _lm, _prompts

N = 9


@pytest.fixture(scope="module")
def fly():
    return FlyThinker(_lm(1), _lm(2, num_layers=2), FlyThinkerConfig(lam=0.5)).eval()


def _pair(model, ids, mask, **kw):
    ref = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="sequential", **kw)
    out = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="process", **kw)
    return ref, out


def test_process_equals_sequential_greedy_padded_and_sampled(fly):
    ids, mask = _prompts((10, 6, 3))
    ref, out = _pair(fly, ids, mask)
    assert torch.equal(out, ref)
    ref, out = _pair(fly, ids, mask, do_sample=True, temperature=0.8, top_p=0.95, seed=3)
    assert torch.equal(out, ref)
    assert len(set(ref.flatten().tolist())) > 1  # the rows are not one repeated token


def test_process_equals_sequential_with_a_projection_of_another_architecture():
    """A qwen2 Reasoner of another width than the llama Generator: R's states come back at R's width."""
    gen, rea = _lm(1), _lm(3, arch="qwen2", hidden_size=16, num_heads=2, num_kv_heads=1)
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.8, width_mode="project")).eval()
    with torch.no_grad():
        model.projection.weight.add_(0.05 * torch.randn(model.projection.weight.shape))
    ids, mask = _prompts((8, 5))
    ref, out = _pair(model, ids, mask)
    assert torch.equal(out, ref)


def test_reasoner_steps_run_in_the_worker_not_here(fly):
    """In this process R runs its prompt pass only; the N - 1 steps run in the worker (another pid), whose replies
    still change G's tokens (a zeroed-out r would give SFT's)."""
    calls = []
    hook = fly.reasoner.model.register_forward_pre_hook(lambda *_: calls.append(1))
    ids, mask = _prompts((7, 7))
    try:
        out = generate(fly, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="process")
    finally:
        hook.remove()
    assert len(calls) == 1
    w = remote.worker()
    assert w.proc.is_alive() and w.proc.pid != os.getpid()
    sft = generate(FlyThinker(fly.generator, None).eval(), ids, mask, max_new_tokens=N, eos_token_id=[])
    assert not torch.equal(out, sft)


def test_worker_sees_in_place_updates_and_receives_replaced_weights():
    model = FlyThinker(_lm(1), _lm(2, num_layers=1), FlyThinkerConfig(lam=0.5)).eval()
    ids, mask = _prompts((8, 4))
    ref, out = _pair(model, ids, mask)
    assert torch.equal(out, ref)
    with torch.no_grad():  # in place, as an optimizer step does: the worker maps the same memory
        for p in model.reasoner.parameters():
            p.mul_(-1.5)
    ref2, out2 = _pair(model, ids, mask)
    assert torch.equal(out2, ref2) and not torch.equal(ref2, ref)
    model.reasoner = _lm(3, num_layers=1).eval()  # a new Reasoner object: sent again
    ref3, out3 = _pair(model, ids, mask)
    assert torch.equal(out3, ref3)


def test_switching_backends_mid_decode_takes_the_cache_back(fly):
    ids, mask = _prompts((9, 5))
    ref = generate(fly, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="sequential")
    s = fly.decoder(ids, mask, DecodeConfig(max_new_tokens=N, concurrent="process"))
    try:
        tokens = [s.prefill().argmax(-1)]
        for i in range(N - 1):
            if i == 3:  # R's cache comes back from the worker, then sequential carries on
                s.set_backend(concurrency.Sequential())
                assert s.r_cache is not None and s.r_cache.get_seq_length() == ids.shape[1] + 3
            if i == 6:  # and goes there again
                s.set_backend(concurrency.make_backend("process", s.g_dev, s.r_dev, (1, 1)))
            tokens.append(s.step(tokens[-1]).argmax(-1))
    finally:
        s.close()
    assert torch.equal(torch.stack(tokens, 1), ref)


@pytest.fixture
def calibrating(monkeypatch, tmp_path):
    monkeypatch.setenv(calibrate.ENV, "1")
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield tmp_path / "cache" / calibrate.CACHE_NAME
    torch.set_num_threads(before)


def test_auto_can_choose_the_process_backend(fly, calibrating, monkeypatch):
    timer = FakeTimer("process 1+1")
    monkeypatch.setattr(calibrate, "perf_step_time", timer)
    ids, mask = _prompts((9, 6))
    s = _stepper(fly, ids, mask)
    try:
        assert s.backend.name == "process" and s.choice.label == "process 1+1" and s.backend.session.holds
    finally:
        s.close()
    assert "process 1+1" in timer.calls
    (entry,) = _entries(calibrating).values()
    assert entry["choice"] == "process 1+1" and "process 1+1" in entry["key"]["candidates"]
    ref = generate(fly, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="sequential")
    assert torch.equal(generate(fly, ids, mask, max_new_tokens=N, eos_token_id=[]), ref)  # auto -> process (cache)


def test_continuous_batching_never_uses_it(fly, calibrating, monkeypatch):
    with pytest.raises(ValueError, match="continuous batch"):
        RowBatch(fly, concurrent="process")
    timer = FakeTimer("process 1+1")
    monkeypatch.setattr(calibrate, "perf_step_time", timer)
    ids, mask = _prompts((6, 6))
    batch = RowBatch(fly)
    try:
        batch.add(ids, mask)
        batch.step(ids[:, -1])
        assert batch.stepper.backend.name != "process" and "process 1+1" not in timer.calls
    finally:
        batch.close()
    with pytest.raises(ConfigError, match="continuous batching"):
        ServeConfig(decode=DecodeConfig(concurrent="process"))
    assert ServeConfig(decode=DecodeConfig(concurrent="process"), batching="wave").batching == "wave"


def test_where_it_cannot_run_is_one_line(fly):
    with pytest.raises(ValueError, match="CPU cores"):
        concurrency.resolve_backend(torch.device("cpu"), torch.device("meta"), "process")
    from flythinker.methods.cos import CoSStepper

    ids, mask = _prompts((5, 5))
    with pytest.raises(ValueError, match="CoS: decode backend 'process'"):
        CoSStepper(fly.generator, ids, mask, ids, mask, DecodeConfig(concurrent="process"), lam=1.0)


def test_a_dead_worker_is_one_error_then_a_fresh_worker(fly):
    ids, mask = _prompts((6, 6))
    s = fly.decoder(ids, mask, DecodeConfig(max_new_tokens=N, concurrent="process"))
    try:
        tok = s.prefill().argmax(-1)
        tok = s.step(tok).argmax(-1)
        old = remote.worker()
        old.proc.kill()
        old.proc.join(10)
        with pytest.raises(RuntimeError, match="worker process (died|is gone)"):
            s.step(tok)
    finally:
        s.close()
    ref, out = _pair(fly, ids, mask)
    assert torch.equal(out, ref) and remote.worker() is not old
