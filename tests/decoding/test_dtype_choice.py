"""Choosing the decode weights dtype by measurement ("auto" on a CPU with native bf16): the faster dtype (by a fake
step timer, never the wall clock) wins and is cached per batch size, a stale entry is measured again, the switch off,
no native bf16 or an explicit dtype measure nothing, the models are left as they were, and the runner, the Predictor,
the checkpoint loader and the server decode in the chosen dtype."""

import json

import pytest
import torch

from flythinker import FlyThinker
from flythinker.decoding import calibrate, dtype_choice
from flythinker.decoding.dtype_choice import choose_decode_dtype, decode_lms
from flythinker.inference import recorded_decode_dtype
from flythinker.testing import tiny_lm, tiny_tokenizer

from .test_calibrate import FakeTimer as CalibrateTimer

PROMPT = 16  # a short probe prefill keeps the tests fast; the timer is fake anyway


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measurement on (the suite turns it and native bf16 off), its cache in a fresh folder; the cache file."""
    monkeypatch.setenv(calibrate.ENV, "1")
    monkeypatch.setenv("FLYTHINKER_NATIVE_BF16", "1")
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return tmp_path / "cache" / calibrate.CACHE_NAME


def FakeTimer(fast):
    """test_calibrate's timer with candidates labelled by dtype: runs each step, reports `fast` (a dtype name) as the
    faster (1 vs 3 ms) and records the dtype of every timed step."""
    return CalibrateTimer(fast, slow=0.003)


@pytest.fixture(scope="module")
def lms():
    return [tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1)]


@pytest.mark.parametrize("fast", ["float32", "bfloat16"])
def test_the_faster_dtype_wins_and_is_cached(measuring, lms, fast):
    timer = FakeTimer(fast)
    choice = choose_decode_dtype(lms, 2, prompt_tokens=PROMPT, time_step=timer)
    assert choice.dtype == getattr(torch, fast) and choice.source == "measured" and choice.batch == 2
    assert set(timer.calls) == {"float32", "bfloat16"}  # both timed ...
    n = len(timer.calls) // 2
    assert timer.calls.count("float32") == timer.calls.count("bfloat16") == n  # ... alike, per model
    # per model: ROUNDS rounds of one block per dtype (its first step untimed): interleaved round by round
    timed = calibrate.BLOCK - 1
    assert timer.calls[:n] == (["float32"] * timed + ["bfloat16"] * timed) * calibrate.ROUNDS
    # summed over both models: each model's median step adds up
    assert choice.ms[fast] == pytest.approx(2 * 1.0) and choice.ms[
        "bfloat16" if fast == "float32" else "float32"] == pytest.approx(2 * 3.0)
    assert f"decode dtype: {fast} (measured: 2.0 vs 6.0 ms/step at batch 2)" == choice.describe()
    entry = json.loads(measuring.read_text())["entries"][choice.key]
    assert entry["choice"] == fast and entry["key"]["batch"] == 2 and entry["key"]["what"] == "decode_dtype"

    again = FakeTimer("float32" if fast == "bfloat16" else "bfloat16")
    reused = choose_decode_dtype(lms, 2, prompt_tokens=PROMPT, time_step=again)
    assert reused.source == "cache" and reused.dtype == choice.dtype and not again.calls
    assert reused.describe().startswith(f"decode dtype: {fast} (cached measurement:")
    # another batch size is its own entry, measured on its own
    other = FakeTimer("float32" if fast == "bfloat16" else "bfloat16")
    assert choose_decode_dtype(lms, 1, prompt_tokens=PROMPT, time_step=other).source == "measured" and other.calls


def test_a_stale_entry_is_measured_again(measuring, lms):
    first = choose_decode_dtype(lms, 1, prompt_tokens=PROMPT, time_step=FakeTimer("bfloat16"), now=1000.0)
    assert first.dtype == torch.bfloat16
    fresh = FakeTimer("float32")
    assert choose_decode_dtype(lms, 1, prompt_tokens=PROMPT, time_step=fresh,
                               now=1000.0 + calibrate.TTL_S - 1).source == "cache" and not fresh.calls
    stale = choose_decode_dtype(lms, 1, prompt_tokens=PROMPT, time_step=fresh, now=1000.0 + calibrate.TTL_S + 1)
    assert stale.source == "measured" and stale.dtype == torch.float32 and fresh.calls
    assert json.loads(measuring.read_text())["entries"][stale.key]["choice"] == "float32"


def test_models_are_left_as_they_were_and_the_rng_untouched(measuring):
    g = tiny_lm("llama", seed=1).train()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    state = torch.random.get_rng_state()
    choose_decode_dtype([g], 1, prompt_tokens=PROMPT, time_step=FakeTimer("bfloat16"))
    assert g.training and next(g.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_cast_copy_is_in_the_other_dtype_and_shares_nothing():
    g = tiny_lm("llama", seed=1)
    c = dtype_choice._cast_copy(g, torch.bfloat16)
    assert {p.dtype for p in c.parameters()} == {torch.bfloat16}
    assert c.get_input_embeddings().weight is c.get_output_embeddings().weight  # tied as in the original
    assert not {p.data_ptr() for p in c.parameters()} & {p.data_ptr() for p in g.parameters()}
    assert torch.equal(c.get_input_embeddings().weight, g.get_input_embeddings().weight.to(torch.bfloat16))


@pytest.mark.parametrize("env", [{calibrate.ENV: "0"}, {"FLYTHINKER_NATIVE_BF16": "0"}, {"WORLD_SIZE": "2"}])
def test_auto_follows_the_fixed_rule_where_nothing_is_measured(measuring, monkeypatch, lms, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    timer = FakeTimer("float32")
    choice = choose_decode_dtype(lms, 1, prompt_tokens=PROMPT, time_step=timer)
    # the fixed rule: bf16 where native (switch off, several processes), fp32 where not
    want = torch.float32 if env.get("FLYTHINKER_NATIVE_BF16") == "0" else torch.bfloat16
    assert choice.source == "rule" and choice.dtype == want and not timer.calls and not measuring.exists()


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_always_wins(measuring, lms, name):
    timer = FakeTimer("float32" if name != "float32" else "bfloat16")
    choice = choose_decode_dtype(lms, 1, name, prompt_tokens=PROMPT, time_step=timer)
    assert choice.dtype == getattr(torch, name) and choice.source == "explicit" and not timer.calls


def test_bad_settings_are_one_line_errors(lms):
    with pytest.raises(ValueError, match="--dtype must be one of"):
        choose_decode_dtype(lms, 1, "fp8", field_name="--dtype")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        choose_decode_dtype(lms, 0)


def test_decode_lms_lists_generator_then_reasoner(lms):
    fly = FlyThinker(lms[0], lms[1])
    assert decode_lms(fly) == [lms[0], lms[1]]
    assert decode_lms(FlyThinker(lms[0], None)) == [lms[0]]
    assert decode_lms(lms[0]) == [lms[0]]


def test_the_models_key_ignores_the_current_dtype(lms):
    assert dtype_choice.models_key([lms[0]]) == dtype_choice.models_key([dtype_choice._cast_copy(lms[0],
                                                                                                   torch.bfloat16)])
    assert dtype_choice.models_key([lms[0]]) != dtype_choice.models_key([lms[1]])


# ----------------------------------------------------------------------------------------------------------------
# the callers decode in the choice


class Chose:
    """A stand-in chooser: records its calls, answers `dtype` (as measured)."""

    def __init__(self, dtype):
        self.dtype, self.calls = dtype, []

    def __call__(self, lms, batch_size, dtype="auto", **kw):
        self.calls.append((len(list(lms)), batch_size, dtype))
        got = self.dtype if dtype == "auto" else getattr(torch, dtype)
        return dtype_choice.DtypeChoice(got, "measured" if dtype == "auto" else "explicit", batch_size,
                                        {"float32": 2.0, "bfloat16": 1.0})


def test_predictor_from_checkpoint_decodes_in_the_choice_at_its_batch_size(measuring, monkeypatch, saved):
    from flythinker.decoding.sampling import DecodeConfig
    from flythinker.inference import Predictor, load_checkpoint

    chose = Chose(torch.bfloat16)
    monkeypatch.setattr(dtype_choice, "choose_decode_dtype", chose)
    p = Predictor.from_checkpoint(saved, decode=DecodeConfig(max_new_tokens=2, batch_size=4))
    assert chose.calls == [(2, 4, "auto")]
    assert {q.dtype for q in p.model.parameters()} == {torch.bfloat16}
    assert p.model.decode_dtype_choice.source == "measured"
    # explicit and batch-less loads do not ask the chooser; batch-less "auto" is the fixed rule run_fingerprint uses
    model, _ = load_checkpoint(saved, "float32", batch_size=4)
    model2, _ = load_checkpoint(saved, "auto")
    assert chose.calls == [(2, 4, "auto")]
    assert next(model.parameters()).dtype == torch.float32 and next(model2.parameters()).dtype == torch.bfloat16


def test_checkpoint_decode_dtype_reads_the_cache_without_loading(measuring, monkeypatch, saved):
    from flythinker import inference
    from flythinker.inference import checkpoint_decode_dtype, load_checkpoint

    real = dtype_choice.choose_decode_dtype
    monkeypatch.setattr(dtype_choice, "choose_decode_dtype",
                        lambda *a, **kw: real(*a, **kw, time_step=FakeTimer("float32")))
    model, _ = load_checkpoint(saved, "auto", batch_size=3)  # measures (a real 256-token probe) and caches
    assert model.decode_dtype_choice.source == "measured" and next(model.parameters()).dtype == torch.float32

    def no_load(*a, **kw):
        raise AssertionError("checkpoint_decode_dtype loaded the checkpoint despite a cached answer")

    monkeypatch.setattr(inference, "load_checkpoint", no_load)
    choice = checkpoint_decode_dtype(saved, "auto", 3)
    assert choice.source == "cache" and choice.dtype == torch.float32
    assert checkpoint_decode_dtype(saved, "bfloat16", 3).source == "explicit"


def test_the_runner_decodes_and_fingerprints_in_the_choice(measuring, monkeypatch, tmp_path, tokenizer):
    from flythinker.data import DataConfig, Example
    from flythinker.decoding.sampling import DecodeConfig
    from flythinker.experiments import runner
    from flythinker.inference import decode_fingerprint
    from flythinker.methods import ModelArgs
    from flythinker.training.config import TrainArgs

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, max_positions=1024).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    examples = [Example(id=f"e{i}", user_id=f"u{i}", input=f"Write the review of album {i}", output="Warm.",
                        profile=[{"text": "I loved it."}], task="generic") for i in range(3)]
    margs = ModelArgs(method="sft", generator=str(gen_dir), reasoner="none")
    data = DataConfig(k=1, profile_tokens=32, min_item_tokens=16, query_tokens=24, target_tokens=8, system_prompt="")
    train = TrainArgs(batch_size=2, grad_accum=1, max_steps=1, progress=False)
    decode = DecodeConfig(max_new_tokens=2, batch_size=2)
    logged = []

    def run():
        return runner.run_method(runner.MethodSpec("SFT", "sft"), examples[:2], examples[2:], margs, data, train,
                                 decode, tmp_path / "out", progress=False, log=logged.append)

    chose = Chose(torch.bfloat16)
    monkeypatch.setattr(runner, "choose_decode_dtype", chose)
    res = run()
    assert chose.calls == [(1, 2, "auto")]
    assert any("decode dtype: bfloat16 (measured: 1.0 vs 2.0 ms/step at batch 2)" in line for line in logged)
    rec = json.loads(res.predictions.read_text().splitlines()[0])
    assert rec["run"]["decode"] == decode_fingerprint(decode, torch.bfloat16)  # the fingerprint tells the truth
    assert json.loads((res.predictions.parent / "timing.json").read_text())["decode_dtype"] == "bfloat16"

    # a begun file keeps its dtype even when the chooser would now say otherwise: the resume is not refused
    monkeypatch.setattr(runner, "choose_decode_dtype", Chose(torch.float32))
    assert recorded_decode_dtype(res.predictions, decode) == torch.bfloat16
    run()
    assert any("as predictions.jsonl was begun" in line for line in logged)
    # remeasure_decode times the row in the dtype its predictions were decoded in
    assert runner._row_decode_dtype(res, tiny_lm()) == torch.bfloat16


def test_the_server_chooses_for_batch_one(measuring, monkeypatch):
    from flythinker.serving import service
    from flythinker.serving.config import ServeConfig

    chose = Chose(torch.bfloat16)
    monkeypatch.setattr(dtype_choice, "choose_decode_dtype", chose)
    built = FlyThinker(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1))

    class Impl:
        def model_args(self, a):
            return a

        def build(self, a):
            return built, tiny_tokenizer()

    monkeypatch.setattr("flythinker.methods.get_method", lambda name: Impl())
    model, _, _ = service.load_model(ServeConfig())
    assert chose.calls == [(2, 1, "auto")] and next(model.parameters()).dtype == torch.bfloat16
