"""Choosing the decode backend by measurement ("auto" on one CPU device): the choice follows the step timer (a fake
one here, never the wall clock), the cache (hit, miss, staleness, key change, a bad or unwritable file), an explicit
backend or the switch off keeps the fixed rule, outputs and the global RNG do not change, the prefill runs with every
thread, the per-step work removed (no Reasoner step under scope "input", no mask scan without padding), and the
backend / Reasoner-device settings reaching the decode from the generate, study and serve flags."""

import json
import threading

import pytest
import torch

from flythinker import FlyThinker, FlyThinkerConfig
from flythinker.config import ConfigError, build_config, from_dict
from flythinker.decoding import calibrate, concurrency
from flythinker.decoding.loop import generate
from flythinker.decoding.sampling import DecodeConfig
from flythinker.hf import device_of
from flythinker.methods.flythinker.decode import choose_backend, per_token_macs
from flythinker.testing import tiny_lm, tiny_tokenizer

from .test_loop import _lm, _prompts

V = 384


@pytest.fixture(scope="module")
def fly():
    return FlyThinker(_lm(1), _lm(2, num_layers=1), FlyThinkerConfig(lam=0.5)).eval()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """Calibration on (the suite's conftest turns it off), its cache in a fresh folder; returns the cache file."""
    monkeypatch.setenv(calibrate.ENV, "1")
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / calibrate.CACHE_NAME


class FakeTimer:
    """A step timer that runs the step and reports `fast` as the faster candidate; records every call."""

    def __init__(self, fast, slow=0.004):
        self.fast, self.slow, self.calls = fast, slow, []

    def __call__(self, candidate, step):
        step()
        self.calls.append(candidate.label)
        return 0.001 if candidate.label == self.fast else self.slow


@pytest.fixture
def timer(monkeypatch):
    def install(fast):
        t = FakeTimer(fast)
        monkeypatch.setattr(calibrate, "perf_step_time", t)
        return t

    return install


def _stepper(model, ids, mask=None, **cfg):
    """A decode's stepper after its prefill and first step ("auto" chooses at the first step)."""
    s = model.decoder(ids, torch.ones_like(ids) if mask is None else mask, DecodeConfig(max_new_tokens=4, **cfg))
    s.prefill()
    s.step(ids[:, -1])
    return s


def _entries(path):
    return json.loads(path.read_text())["entries"]


# ----------------------------------------------------------------------------------------------------------------
# the choice, the cache


@pytest.mark.parametrize("fast", ["sequential", "threads 1+1"])
def test_auto_runs_the_candidate_the_timer_finds_faster(fly, two_threads, cache, timer, fast):
    t = timer(fast)
    ids, _ = _prompts((9, 9))
    s = _stepper(fly, ids)
    try:
        assert s.choice is not None and s.choice.source == "measured" and s.choice.label == fast
        assert s.backend.name == fast.split()[0]
        if s.backend.name == "threads":
            assert (s.backend.n_g, s.backend.n_r) == (1, 1)
    finally:
        s.close()
    # every candidate timed the same number of steps (each block's first step is the untimed switch-over)
    per = calibrate.ROUNDS * (calibrate.BLOCK - 1)
    assert sorted(t.calls) == sorted(["sequential"] * per + ["threads 1+1"] * per + ["process 1+1"] * per)
    assert torch.get_num_threads() == 2  # the probe's "threads" candidate handed the caller's thread back
    (entry,) = _entries(cache).values()
    assert entry["choice"] == fast and set(entry["ms"]) == {"sequential", "threads 1+1", "process 1+1"}
    assert entry["key"]["batch"] == 2 and entry["key"]["machine"]["threads"] == 2
    assert entry["key"]["machine"]["torch"] == torch.__version__


def test_calibration_is_a_short_probe(fly, two_threads, cache, timer):
    """The probe decodes a short prompt for rounds x block steps per candidate: one prefill + those steps of G
    (beside the real decode's prefill and first step)."""
    timer("threads 1+1")
    calls = []
    hook = fly.generator.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    ids = torch.randint(3, V, (1, 200))
    try:
        s = _stepper(fly, ids)
        s.close()
    finally:
        hook.remove()
    n = len(calibrate.candidates(per_token_macs(fly), 2))
    assert len(calls) - 2 == 1 + calibrate.probe_steps(n) == 1 + calibrate.ROUNDS * calibrate.BLOCK * n


def test_choose_backend_takes_the_timer_as_an_argument(fly, two_threads, cache):
    t = FakeTimer("threads 1+1")
    ids, _ = _prompts((9, 9))
    name, split, choice = choose_backend(fly, ids, DecodeConfig(), time_step=t)
    assert (name, split, choice.source) == ("threads", (1, 1), "measured") and t.calls
    assert choose_backend(fly, ids, DecodeConfig(concurrent="sequential"), time_step=t) == ("sequential", None, None)


def test_cache_hit_miss_staleness_and_key_change(fly, two_threads, cache, timer):
    t = timer("threads 1+1")
    ids, _ = _prompts((9, 9))
    _stepper(fly, ids).close()
    measured = len(t.calls)
    s = _stepper(fly, ids)  # hit: nothing timed
    s.close()
    assert s.choice.source == "cache" and s.choice.label == "threads 1+1" and len(t.calls) == measured
    assert s.backend.name == "threads"

    # stale: an entry older than the TTL is measured again (and the new answer replaces it)
    data = json.loads(cache.read_text())
    (digest,) = data["entries"]
    data["entries"][digest]["measured_at"] -= calibrate.TTL_S + 60
    cache.write_text(json.dumps(data))
    t.fast = "sequential"
    s = _stepper(fly, ids)
    s.close()
    assert s.choice.source == "measured" and s.choice.label == "sequential" and len(t.calls) == 2 * measured
    assert _entries(cache)[digest]["choice"] == "sequential"

    # another batch size, another model pair: other keys, measured, each its own entry
    _stepper(fly, ids[:1]).close()
    other = FlyThinker(_lm(1), _lm(3, num_layers=2), FlyThinkerConfig(lam=0.5)).eval()
    _stepper(other, ids).close()
    entries = _entries(cache)
    assert len(t.calls) == 4 * measured and len(entries) == 3
    assert sorted(e["key"]["batch"] for e in entries.values()) == [1, 2, 2]


def test_rows_joining_a_running_batch_never_measure(fly, two_threads, cache, timer):
    """The server's running batch (continuous batching): the decode measures at its first step, for the rows it has
    then; a stepper built for joining rows is merged before it steps, so it measures nothing."""
    from flythinker.decoding.continuous import RowBatch

    t = timer("threads 1+1")
    batch = RowBatch(fly)
    try:
        batch.add(*_prompts((7,)))
        batch.add(*_prompts((5,), seed=1))  # joins before the first step
        assert t.calls == []
        batch.step(torch.tensor([5, 6]))
        measured = len(t.calls)
        assert measured > 0 and [e["key"]["batch"] for e in _entries(cache).values()] == [2]
        assert batch.stepper.backend.name == "threads"
        batch.add(*_prompts((6,), seed=2))
        batch.step(torch.tensor([5, 6, 7]))
        assert len(t.calls) == measured and len(_entries(cache)) == 1
    finally:
        batch.close()


def test_choose_with_an_injected_timer_and_clock(tmp_path):
    """`choose` alone: the timer decides, `now` decides staleness, a corrupt file is measured over."""
    path = tmp_path / "c.json"
    cands = calibrate.candidates((3, 1), 4)
    steps = []

    def open_probe(n):
        steps.append(n)
        return (lambda c: None), (lambda: None)

    fast = FakeTimer(cands[-1].label)
    c = calibrate.choose({"k": 1}, cands, open_probe, time_step=fast, path=path, now=1000.0)
    assert c.source == "measured" and c.label == cands[-1].label and steps == [calibrate.probe_steps(len(cands))]
    assert calibrate.choose({"k": 1}, cands, open_probe, time_step=fast, path=path, now=1000.0 + 5).source == "cache"
    late = calibrate.choose({"k": 1}, cands, open_probe, time_step=fast, path=path,
                            now=1000.0 + calibrate.TTL_S + 1)
    assert late.source == "measured" and len(steps) == 2
    path.write_text("{not json")
    again = calibrate.choose({"k": 1}, cands, open_probe, time_step=fast, path=path, now=2.0)
    assert again.source == "measured" and json.loads(path.read_text())["version"] == calibrate.VERSION


def test_an_unwritable_cache_still_decodes(fly, two_threads, monkeypatch, tmp_path, timer):
    monkeypatch.setenv(calibrate.ENV, "1")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("FLYTHINKER_CACHE", str(blocker))  # mkdir under a file fails
    timer("threads 1+1")
    ids, _ = _prompts((9, 9))
    ref = generate(fly, ids, max_new_tokens=6, eos_token_id=[], concurrent="sequential")
    assert torch.equal(generate(fly, ids, max_new_tokens=6, eos_token_id=[]), ref)


def test_candidates():
    assert calibrate.candidates((3, 1), 1) == [calibrate.Candidate("sequential")]
    assert [c.label for c in calibrate.candidates((3, 1), 2)] == ["sequential", "threads 1+1", "process 1+1"]
    assert [c.label for c in calibrate.candidates((3, 1), 2, remote=False)] == ["sequential", "threads 1+1"]
    many = calibrate.candidates((7, 1), 8)
    assert many[-1] == calibrate.Candidate("process", concurrency.split_threads(7, 1, 8))
    many = many[:-1]
    splits = [c.cpu_threads for c in many[1:]]
    assert many[0].backend == "sequential" and len(splits) == len(set(splits)) >= 2
    assert all(a + b == 8 and b >= 1 for a, b in splits)
    assert splits[0] == concurrency.split_threads(7, 1, 8)  # the cost-based split comes first
    assert [c.label for c in calibrate.candidates((7, 1), 8, split=(5, 2))] == ["sequential", "threads 5+2",
                                                                              "process 5+2"]


# ----------------------------------------------------------------------------------------------------------------
# when it does not measure


@pytest.mark.parametrize("concurrent,backend", [("sequential", "sequential"), ("threads", "threads"),
                                                (True, "threads"), (False, "sequential")])
def test_an_explicit_backend_wins(fly, two_threads, cache, timer, concurrent, backend):
    t = timer("threads 1+1")
    ids, _ = _prompts((9, 9))
    s = _stepper(fly, ids, concurrent=concurrent)
    s.close()
    assert s.backend.name == backend and s.choice is None and t.calls == [] and not cache.exists()


def test_switched_off_or_one_thread_follows_the_fixed_rule(fly, two_threads, cache, timer, monkeypatch):
    t = timer("threads 1+1")
    ids, _ = _prompts((9, 9))
    monkeypatch.setenv(calibrate.ENV, "0")
    s = _stepper(fly, ids)
    s.close()
    assert s.backend.name == concurrency.resolve_backend(torch.device("cpu"), torch.device("cpu"), "auto", 2)
    assert s.choice is None and t.calls == [] and not cache.exists()
    monkeypatch.setenv(calibrate.ENV, "1")
    torch.set_num_threads(1)
    s = _stepper(fly, ids)
    s.close()
    assert s.backend.name == "sequential" and s.choice is None and t.calls == [] and not cache.exists()


# ----------------------------------------------------------------------------------------------------------------
# outputs, threads


@pytest.mark.parametrize("fast", ["sequential", "threads 1+1"])
def test_outputs_and_global_rng_unchanged_by_calibration(fly, two_threads, cache, timer, fast):
    timer(fast)
    ids, mask = _prompts((9, 6, 3))
    torch.manual_seed(5)
    ref = generate(fly, ids, mask, max_new_tokens=10, eos_token_id=[], concurrent="sequential")
    ref_sampled = generate(fly, ids, mask, max_new_tokens=10, eos_token_id=[], concurrent="sequential",
                           do_sample=True)  # seed None: the global RNG draws
    after_ref = torch.rand(3)
    torch.manual_seed(5)
    out = generate(fly, ids, mask, max_new_tokens=10, eos_token_id=[])  # measures here (fresh cache)
    sampled = generate(fly, ids, mask, max_new_tokens=10, eos_token_id=[], do_sample=True)
    assert torch.equal(out, ref) and torch.equal(sampled, ref_sampled) and torch.equal(torch.rand(3), after_ref)
    assert len(_entries(cache)) == 1


def _thread_log(model):
    seen = []

    def hook(name):
        return lambda *_: seen.append((name, threading.current_thread().name, torch.get_num_threads()))

    hooks = [model.reasoner.model.register_forward_pre_hook(hook("R")),
             model.generator.model.register_forward_pre_hook(hook("G"))]
    return seen, hooks


@pytest.mark.parametrize("caller", [1, 2])
def test_prefill_runs_with_every_thread_and_only_steps_split(fly, caller):
    """cpu_threads (1, 1): the prompt passes of R then G run on the caller's thread with 2 threads; the steps run G
    on the caller with 1 and R on the worker with 1; the caller's count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(caller)
    seen, hooks = _thread_log(fly)
    ids, mask = _prompts((9, 9))
    try:
        generate(fly, ids, mask, max_new_tokens=4, eos_token_id=[], concurrent="threads", cpu_threads=(1, 1))
        after = torch.get_num_threads()
    finally:
        for h in hooks:
            h.remove()
        torch.set_num_threads(before)
    me = threading.current_thread().name
    assert seen[:2] == [("R", me, 2), ("G", me, 2)]
    steps = seen[2:]
    assert sorted(steps) == sorted([("G", me, 1)] * 3 + [("R", "flythinker-reasoner", 1)] * 3)
    assert after == caller


def test_threads_backend_holds_the_caller_between_steps_and_restores_on_its_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        b = concurrency.Threads(1, 1)
        seen = []
        r, g = b.step(lambda: torch.get_num_threads(), lambda: seen.append(torch.get_num_threads()) or 7)
        assert (r, g, seen) == (1, 7, [1])
        assert torch.get_num_threads() == 1 and concurrency.thread_budget() == 2  # held between steps
        with b.prefill_scope():  # a row joining mid-decode prefills with the whole budget
            assert torch.get_num_threads() == 2
        b.step(lambda: None, lambda: None)
        assert torch.get_num_threads() == 1
        b.close()
        assert torch.get_num_threads() == 2 and concurrency.thread_budget() == 2
        # closed from another thread (a decode collected elsewhere), it cannot restore this thread's count
        b = concurrency.Threads(1, 1)
        b.step(lambda: None, lambda: None)
        other = threading.Thread(target=b.close)
        other.start()
        other.join()
        assert torch.get_num_threads() == 1
    finally:
        concurrency._PINNED.budget = None
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------
# per-step work removed


def _assert_teacher_forced(model, ids, mask, out, atol=1e-4):
    full = torch.cat([ids, out], 1)
    fmask = torch.cat([mask, torch.ones_like(out)], 1)
    resp = torch.cat([torch.zeros_like(ids), torch.ones_like(out)], 1).bool()
    with torch.no_grad():
        logits = model(full, fmask, response_mask=resp).logits[:, ids.shape[1] - 1: -1]      # (B, N, V)
    for b, i in (logits.argmax(-1) != out).nonzero().tolist():
        assert logits[b, i].max() - logits[b, i, out[b, i]] <= atol, (b, i)


def test_scope_input_runs_no_reasoner_steps():
    """With scope "input" a generated token is never fused, so R runs on the prompt only; the decode still equals
    teacher forcing."""
    model = FlyThinker(_lm(1), _lm(2, num_layers=1), FlyThinkerConfig(lam=0.5, scope="input")).eval()
    ids, mask = _prompts((9, 5))
    calls = []
    hook = model.reasoner.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = generate(model, ids, mask, max_new_tokens=8, eos_token_id=[], concurrent="threads")
    finally:
        hook.remove()
    assert len(calls) == 1
    _assert_teacher_forced(model, ids, mask, out)


def test_steps_pass_no_mask_only_without_padding(fly):
    masks = []
    hook = fly.generator.model.register_forward_pre_hook(
        lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        ids, mask = _prompts((9, 9))
        flat = generate(fly, ids, mask, max_new_tokens=6, eos_token_id=[], concurrent="sequential")
        n_flat = len(masks)
        padded_ids, padded_mask = _prompts((9, 4))
        generate(fly, padded_ids, padded_mask, max_new_tokens=6, eos_token_id=[], concurrent="sequential")
    finally:
        hook.remove()
    assert all(m is None for m in masks[1:n_flat]) and masks[0] is not None  # the prefill keeps its mask
    assert all(isinstance(m, torch.Tensor) for m in masks[n_flat:])
    _assert_teacher_forced(fly, ids, mask, flat)
    assert torch.equal(flat, generate(fly, ids, mask, max_new_tokens=6, eos_token_id=[], concurrent="threads"))


# ----------------------------------------------------------------------------------------------------------------
# the settings: --decode.backend, --reasoner-device


def test_backend_is_an_alias_of_concurrent():
    d = DecodeConfig(backend="threads")
    assert d.concurrent == "threads" and d.backend is None
    assert DecodeConfig(backend="auto").concurrent == "auto"
    with pytest.raises(ValueError, match="backend"):
        DecodeConfig(backend="fast")
    with pytest.raises(ValueError, match="disagree"):
        DecodeConfig(backend="threads", concurrent="sequential")
    from flythinker.experiments.study import StudyConfig

    assert from_dict(StudyConfig, {"decode": {"backend": "sequential"}}).decode.concurrent == "sequential"


def _parse(verb, argv):
    import importlib

    from flythinker.cli.main import VERBS, Parser

    parser = Parser(prog=f"flythinker {verb}")
    importlib.import_module(VERBS[verb][0]).add_cli(parser)
    return parser.parse_args(argv)


def test_flags_parse_for_generate_study_and_serve():
    from flythinker.cli.generate import decode_config
    from flythinker.experiments.study import StudyConfig
    from flythinker.serving.config import ServeConfig

    args = _parse("generate", ["--checkpoint", "c", "--data", "d", "--out", "o", "--decode.backend", "threads",
                               "--reasoner-device", "cpu"])
    assert decode_config(args).concurrent == "threads" and args.reasoner_device == "cpu"
    assert decode_config(_parse("generate", ["--checkpoint", "c", "--data", "d", "--out", "o"])).concurrent == "auto"
    study = build_config(StudyConfig, _parse("study", ["--decode.backend", "threads", "--reasoner-device", "cpu"]))
    assert study.decode.concurrent == "threads" and study.reasoner_device == "cpu"
    serve = build_config(ServeConfig, _parse("serve", ["--decode.backend", "sequential", "--reasoner_device", "cpu"]))
    assert serve.decode.concurrent == "sequential" and serve.reasoner_device == "cpu"


needs_no_second_gpu = pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="cuda:1 exists here")


@needs_no_second_gpu
def test_a_missing_reasoner_device_is_one_line():
    from flythinker.experiments.study import StudyConfig
    from flythinker.serving.config import ServeConfig

    for make in (lambda: concurrency.check_device("cuda:1", "--reasoner-device"),
                 lambda: StudyConfig(reasoner_device="cuda:1"), lambda: ServeConfig(reasoner_device="cuda:1")):
        with pytest.raises(ConfigError, match="cuda:1") as e:
            make()
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not a device"):
        concurrency.check_device("gpu-please")
    assert concurrency.check_device("cpu") == torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tok = tiny_tokenizer()
    FlyThinker(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1), tokenizer=tok).save_pretrained(
        root / "ckpt")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "user_id": "u", "input": f"Write about album {i}.",
                                        "output": "ref", "profile": [{"text": f"Earlier review {i}."}]}) + "\n"
                            for i in range(3)))
    return root / "ckpt", data


def test_reasoner_device_reaches_the_model_and_generate(checkpoint, tmp_path, capsys):
    from flythinker.cli.main import main
    from flythinker.inference import load_checkpoint

    ckpt, data = checkpoint
    model, _ = load_checkpoint(ckpt, "float32", reasoner_device="cpu")
    assert device_of(model.reasoner) == torch.device("cpu")
    sft = FlyThinker(tiny_lm("llama", seed=1))
    assert concurrency.place_reasoner(sft, "cpu") is sft  # no Reasoner: nothing to move

    common = ["generate", "--checkpoint", str(ckpt), "--data", str(data), "--max-new-tokens", "5", "--batch-size",
              "2", "--no-progress", "--dtype", "float32", "--data.retrieval", "recency"]
    assert main(common + ["--out", str(tmp_path / "a.jsonl")]) == 0
    assert main(common + ["--out", str(tmp_path / "b.jsonl"), "--reasoner-device", "cpu",
                          "--decode.backend", "threads"]) == 0
    preds = [[json.loads(x)["prediction"] for x in (tmp_path / f).read_text().splitlines()]
             for f in ("a.jsonl", "b.jsonl")]
    assert preds[0] == preds[1] and len(preds[0]) == 3
    if torch.cuda.device_count() < 2:
        capsys.readouterr()
        assert main(common + ["--out", str(tmp_path / "c.jsonl"), "--reasoner-device", "cuda:1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--reasoner-device" in err and "cuda:1" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "c.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------
# the bench's row of its own


def test_bench_times_auto_as_its_own_row(two_threads, cache, timer, capsys):
    from flythinker.cli.main import main

    timer("threads 1+1")
    rc = main(["bench", "decode", "--model", "tiny", "--prompt-tokens", "12", "--new-tokens", "3", "--batch", "1",
               "--runs", "1", "--threads", "2", "--dtype", "float32"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["auto_backend"] == "threads" and result["auto_threads"] == [1, 1]
    assert result["auto_source"] == "cache"  # measured in the warm-up, read back for the timed runs and the report
    assert result["auto_ms"] > 0 and result["best_ms"] > 0
    assert [r["backend"] for r in result["rows"] if r["method"] == "auto"] == ["auto"]
    assert len(_entries(cache)) == 1
