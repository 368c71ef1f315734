"""The decode loop with FlyThinker's two-model step: cached decoding equals teacher forcing for every scope, backends agree token for token,
left-padded rows equal their prompt alone, λ=0 equals transformers' own generate, sampling, EOS, streaming,
backend selection (CUDA paths through fakes) and bad-input errors."""

import threading

import pytest
import torch

from flythinker import FlyThinker, FlyThinkerConfig
from flythinker.decoding import concurrency
from flythinker.decoding.loop import generate, stream
from flythinker.decoding.sampling import DecodeConfig, sample_next_token
from flythinker.methods.flythinker import decode as fdecode
from flythinker.methods.flythinker.decode import resolve_backend, split_threads
from flythinker.testing import tiny_config

V = 384
N = 16


def _lm(seed, arch="llama", std=0.1, **kw):
    """A tiny random LM with untied, larger weights: the default init (std 0.02, tied head) makes greedy decoding
    repeat one token, which would let a wrong decoder pass."""
    return untied_scaled_lm(tiny_config(arch, **kw), seed, std)


def untied_scaled_lm(cfg, seed, std=0.1):
    """The model of `cfg` with an untied head and every matrix drawn at `std` (seeded), in eval mode."""
    from transformers import AutoModelForCausalLM

    cfg.tie_word_embeddings = False
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return _lm(1), _lm(2, num_layers=1)


def _prompts(lengths=(10, 7, 4), seed=0):
    """Left-padded batch of random prompts with the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(3, V, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def _assert_teacher_forced(model, ids, mask, out, atol=1e-4):
    """Each generated token is the argmax of the teacher-forced forward over prompt + generated (float ties
    allowed: then the chosen token's logit is within atol of the maximum)."""
    full = torch.cat([ids, out], 1)
    fmask = torch.cat([mask, torch.ones_like(out)], 1)
    resp = torch.cat([torch.zeros_like(ids), torch.ones_like(out)], 1).bool()
    with torch.no_grad():
        logits = model(full, fmask, response_mask=resp).logits[:, ids.shape[1] - 1: -1]  # (B, N, V)
    pred = logits.argmax(-1)
    for b, i in (pred != out).nonzero().tolist():
        gap = logits[b, i].max() - logits[b, i, out[b, i]]
        assert gap <= atol, f"row {b} step {i}: token {int(out[b, i])} is {float(gap):.2e} below the argmax"


@pytest.mark.parametrize("scope", ["global", "input", "output"])
def test_greedy_equals_teacher_forcing(models, scope):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.7, scope=scope))
    ids, mask = _prompts()
    out = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="sequential")
    assert out.shape == (3, N) and out.dtype == torch.long
    assert len(set(out[0].tolist())) > 3  # not a degenerate repetition
    _assert_teacher_forced(model, ids, mask, out)


def test_reasoner_changes_tokens(models):
    ids, mask = _prompts()
    a = generate(FlyThinker(models[0]), ids, mask, max_new_tokens=N, eos_token_id=[])
    b = generate(FlyThinker(*models, FlyThinkerConfig(lam=1.0)), ids, mask, max_new_tokens=N, eos_token_id=[])
    assert not torch.equal(a, b)


def test_width_mismatch_projection_matches_teacher_forcing():
    gen, rea = _lm(1), _lm(3, arch="qwen2", hidden_size=16, num_heads=2, num_kv_heads=1)
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.8, width_mode="project"))
    with torch.no_grad():  # move off the zero-pad initialisation so the projection really matters
        model.projection.weight.add_(0.05 * torch.randn(model.projection.weight.shape))
    ids, mask = _prompts()
    seq = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="sequential")
    _assert_teacher_forced(model, ids, mask, seq)
    assert torch.equal(seq, generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="threads"))


@pytest.mark.parametrize("mode", ["center", "standardize"])
def test_greedy_equals_teacher_forcing_with_normalized_fusion(models, mode):
    """The decode engine goes through the same fuse(), so the calibrated affine map applies identically."""
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.7, normalize=mode))
    ids, mask = _prompts()
    model.calibrate([(ids, mask)])
    out = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="sequential")
    _assert_teacher_forced(model, ids, mask, out)
    assert torch.equal(out, generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="threads"))


@pytest.mark.parametrize("concurrent", ["threads", True, "auto"])
def test_concurrent_equals_sequential(models, concurrent):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, mask = _prompts()
    ref = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="sequential")
    assert torch.equal(generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent=concurrent), ref)


def test_padded_rows_equal_prompts_alone(models):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, mask = _prompts((10, 6, 3))
    batch = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[])
    for b in range(3):
        alone = ids[b: b + 1, mask[b].argmax():]
        single = generate(model, alone, max_new_tokens=N, eos_token_id=[])
        if not torch.equal(single[0], batch[b]):  # padding changes float summation order: allow only ties
            _assert_teacher_forced(model, alone, torch.ones_like(alone), batch[b: b + 1])


@pytest.mark.parametrize("variant", ["no_reasoner", "lam0"])
def test_without_fusion_equals_transformers_generate(models, variant):
    gen, rea = models
    model = FlyThinker(gen, None) if variant == "no_reasoner" else FlyThinker(gen, rea, FlyThinkerConfig(lam=0.0))
    ids, mask = _prompts((9, 5))
    kw = {"max_new_tokens": N, "eos_token_id": 7, "pad_token_id": 0}
    ref = gen.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)[:, ids.shape[1]:]
    ours = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(ours, ref)


def test_seeded_sampling_reproducible_across_backends_and_runs(models):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, mask = _prompts()
    kw = {"max_new_tokens": N, "do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "eos_token_id": []}
    a = generate(model, ids, mask, seed=7, concurrent="sequential", **kw)
    assert torch.equal(a, generate(model, ids, mask, seed=7, concurrent="threads", **kw))
    assert torch.equal(a, generate(model, ids, mask, seed=7, concurrent="sequential", **kw))
    assert not torch.equal(a, generate(model, ids, mask, seed=8, **kw))
    assert not torch.equal(a, generate(model, ids, mask, max_new_tokens=N, eos_token_id=[]))  # sampled != greedy


@pytest.mark.parametrize("several", [False, True])
def test_eos_per_row(models, several):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, mask = _prompts()
    free = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[])
    eos = [int(free[0, 3])] + ([int(free[1, 5])] if several else [])
    out = generate(model, ids, mask, max_new_tokens=N, eos_token_id=eos if several else eos[0], pad_token_id=1)
    ends = []
    for b in range(3):
        hits = [i for i, tok in enumerate(free[b].tolist()) if tok in eos]
        end = hits[0] + 1 if hits else N
        ends.append(end)
        assert torch.equal(out[b, :end], free[b, :end])
        assert (out[b, end:] == 1).all()
    assert out.shape[1] == max(ends)  # stops as soon as every row is done (or at max_new_tokens)


def test_eos_and_pad_defaults_from_generation_config(models):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, mask = _prompts()
    free = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[])
    gc = model.generator.generation_config
    old = (gc.eos_token_id, gc.pad_token_id)
    try:
        gc.eos_token_id, gc.pad_token_id = int(free[0, 2]), None
        out = generate(model, ids, mask, max_new_tokens=N)
        end = free[0].tolist().index(int(free[0, 2])) + 1
        assert torch.equal(out[0, :end], free[0, :end])
        assert (out[0, end:] == model.generator.config.pad_token_id).all()  # config pad when the GC has none
    finally:
        gc.eos_token_id, gc.pad_token_id = old


def test_stream_and_streamers(models, tokenizer, capsys):
    from transformers import TextStreamer

    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, mask = _prompts((8,))
    out = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[])
    cols = list(stream(model, ids, mask, max_new_tokens=N, eos_token_id=[]))
    assert all(c.shape == (1,) for c in cols) and torch.equal(torch.stack(cols, 1), out)
    cols[0].add_(1)  # yielded columns are ordinary tensors the caller may modify

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended += 1

    rec = Recorder()
    assert torch.equal(generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], streamer=rec), out)
    assert torch.equal(rec.puts[0], ids) and rec.ended == 1  # prompt first, as transformers' generate does
    assert torch.equal(torch.stack(rec.puts[1:], 1), out)

    capsys.readouterr()
    generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out.rstrip("\n") == tokenizer.decode(out[0].tolist())


def test_threads_backend_runs_reasoner_on_pinned_worker(models):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    seen = []
    hook = model.reasoner.model.register_forward_pre_hook(
        lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled())))
    ids, mask = _prompts()
    before = torch.get_num_threads()
    try:
        generate(model, ids, mask, max_new_tokens=4, eos_token_id=[], concurrent="threads", cpu_threads=(1, 1))
    finally:
        hook.remove()
    assert seen[0][0] == threading.current_thread().name  # the prefill runs on the caller's thread
    assert all(s == ("flythinker-reasoner", 1, False) for s in seen[1:]) and len(seen) == 4
    assert torch.get_num_threads() == before


def test_two_devices_path_on_cpu(models, monkeypatch):
    """Logic of the two-device backend with both 'devices' on CPU: R runs on the worker thread and the result
    equals sequential decoding."""
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, mask = _prompts()
    ref = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], concurrent="sequential")
    monkeypatch.setattr(concurrency, "same_device", lambda a, b: False)
    assert resolve_backend(model, "auto") == "two_devices"
    names = []
    hook = model.reasoner.model.register_forward_pre_hook(lambda *_: names.append(threading.current_thread().name))
    try:
        out = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[])
    finally:
        hook.remove()
    assert torch.equal(out, ref) and set(names[1:]) == {"flythinker-reasoner"}


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name}.wait({other.name})")


class _FakeCuda:
    """Records the stream protocol so the CUDA-streams backend's ordering can be checked on CPU."""

    def __init__(self):
        self.log = []
        self.main = _FakeStream("main", self.log)

    def current_stream(self, device=None):
        return self.main

    def Stream(self, device=None):
        return _FakeStream("side", self.log)

    def stream(self, s):
        log = self.log

        class _Ctx:
            def __enter__(self):
                log.append(f"enter({s.name})")

            def __exit__(self, *exc):
                log.append(f"exit({s.name})")

        return _Ctx()


def test_cuda_streams_protocol_with_fake_cuda(models, monkeypatch):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, mask = _prompts()
    ref = generate(model, ids, mask, max_new_tokens=5, eos_token_id=[], concurrent="sequential")
    fake = _FakeCuda()
    monkeypatch.setattr(fdecode, "resolve_backend", lambda *a, **k: "cuda_streams")
    monkeypatch.setattr(concurrency, "make_backend",
                        lambda *a, **k: concurrency.CudaStreams(torch.device("cpu"), cuda=fake))
    assert torch.equal(generate(model, ids, mask, max_new_tokens=5, eos_token_id=[]), ref)
    one = ["side.wait(main)", "enter(side)", "exit(side)", "main.wait(side)"]
    assert fake.log == one * 5  # prefill + 4 steps, each fenced both ways


def test_resolve_backend_rules(models, monkeypatch):
    gen, rea = models
    fly = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.5))
    assert resolve_backend(FlyThinker(gen), "threads") == "sequential"  # nothing to overlap without fusion
    assert resolve_backend(FlyThinker(gen, rea, FlyThinkerConfig(lam=0.0)), True) == "sequential"
    assert resolve_backend(fly, "auto", num_threads=2) == "sequential"  # measured: 2 threads for G beat 1+1
    assert resolve_backend(fly, "auto", num_threads=8) == "threads"
    assert resolve_backend(fly, True, num_threads=1) == "threads"
    assert resolve_backend(fly, False) == "sequential"
    with pytest.raises(ValueError, match="cuda_streams"):
        resolve_backend(fly, "cuda_streams")
    with pytest.raises(ValueError, match="two_devices"):
        resolve_backend(fly, "two_devices")
    with pytest.raises(ValueError, match="concurrent"):
        resolve_backend(fly, "fast")
    # placements on GPUs, through a fake device lookup
    devices = {id(gen): torch.device("cuda:0"), id(rea): torch.device("cuda:0")}
    monkeypatch.setattr(fdecode, "device_of", lambda lm: devices[id(lm)])
    assert resolve_backend(fly, "auto") == "cuda_streams"
    with pytest.raises(ValueError, match="threads"):
        resolve_backend(fly, "threads")
    devices[id(rea)] = torch.device("cuda:1")
    assert resolve_backend(fly, "auto") == "two_devices" and resolve_backend(fly, True) == "two_devices"


def test_split_threads(models):
    fly = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    assert split_threads(fly, 1) == (1, 1) and split_threads(fly, 2) == (1, 1)
    n_g, n_r = split_threads(fly, 16)
    assert n_g + n_r == 16 and n_g > n_r >= 1
    c_g, c_r = fdecode.per_token_macs(fly)
    assert c_g > c_r > 0 and fdecode.per_token_macs(fly, context=100)[0] > c_g


def test_sample_next_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next_token(logits).tolist() == [1, 0]
    assert sample_next_token(logits, do_sample=True, temperature=0.0).tolist() == [1, 0]
    big = logits.repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(big, g, do_sample=True, top_k=1).tolist() == [1, 0] * 200
    picks = sample_next_token(big, g, do_sample=True, temperature=2.0, top_k=2)
    assert set(picks[0::2].tolist()) == {1, 3}
    probs = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(400, 1)
    picks = sample_next_token(probs, g, do_sample=True, top_p=0.7)
    assert set(picks.tolist()) == {0, 1}
    assert set(sample_next_token(probs, g, do_sample=True, top_p=0.01).tolist()) == {0}
    a = sample_next_token(big, torch.Generator().manual_seed(3), do_sample=True)
    assert torch.equal(a, sample_next_token(big, torch.Generator().manual_seed(3), do_sample=True))


def test_restores_training_mode(models):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5)).train()
    generate(model, *_prompts(), max_new_tokens=2)
    assert model.training and model.generator.training
    model.eval()


def test_bad_inputs(models):
    model = FlyThinker(*models, FlyThinkerConfig(lam=0.5))
    ids, mask = _prompts()
    cases = [
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "empty prompt"),
        ({"attention_mask": torch.cat([torch.zeros(1, 10, dtype=torch.long), mask[1:]])}, "empty prompt"),
        ({"attention_mask": mask[:, 1:]}, "same shape"),
        ({"attention_mask": mask.flip(1)}, "left-padded"),
        ({"input_ids": ids[0]}, "batch, length"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 600}, "context of 512"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"concurrent": "gpu"}, "concurrent"),
        ({"cpu_threads": (0, 1)}, "cpu_threads"),
    ]
    for override, match in cases:
        kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 4} | override
        with pytest.raises(ValueError, match=match):
            generate(model, **kw)
        with pytest.raises(ValueError, match=match):
            stream(model, **kw)  # eager: before the first next()
    with pytest.raises(TypeError, match="max_tokens"):
        generate(model, ids, mask, max_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodeConfig(max_new_tokens=True)
