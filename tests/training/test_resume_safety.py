"""A run owns its out_dir: settings are range-checked, another run's checkpoints are never adopted or pruned, a
resume falls back past unreadable checkpoints, a diverging run stops before saving NaN weights, two runs cannot
share an out_dir, and a saved model that is not whole fails with one line naming the file."""

import hashlib
import json
import math
import shutil

import pytest
import torch

from flythinker import FlyThinker
from flythinker.safeio import exclusive_lock
from flythinker.training import checkpoint as ckpt_mod
from flythinker.training.checkpoint import latest_checkpoint, run_identity, step_checkpoints
from flythinker.training.config import TrainArgs, TrainConfig
from flythinker.training.loop import fit
from flythinker.utils import UserError

from .test_loop import _args, _models, make_features


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".flythinker.lock"}


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------------
# settings

@pytest.mark.parametrize("field,value,expect", [
    ("lr_generator", float("nan"), "train.lr_generator: must be a finite number"),
    ("lr_reasoner", float("inf"), "train.lr_reasoner: must be a finite number"),
    ("lr_projection", -1e-3, "train.lr_projection: must be >= 0"),
    ("weight_decay", -0.1, "train.weight_decay: must be >= 0"),
    ("warmup_ratio", 1.5, "train.warmup_ratio: must be in [0, 1]"),
    ("min_lr_ratio", -0.1, "train.min_lr_ratio: must be in [0, 1]"),
    ("max_grad_norm", float("nan"), "train.max_grad_norm: must be a finite number"),
    ("max_grad_norm", -1.0, "train.max_grad_norm: must be >= 0"),
    ("keep_checkpoints", -1, "train.keep_checkpoints: must be >= 0"),
    ("log_every", 0, "train.log_every: must be >= 1"),
    ("save_every", -2, "train.save_every: must be >= 0"),
    ("calibration_examples", -1, "train.calibration_examples: must be >= 0"),
    ("threads", -1, "train.threads: must be >= 0"),
    ("max_steps", -1, "train.max_steps: must be >= 0"),
    ("batch_size", 0, "train.batch_size: must be >= 1"),
    ("grad_accum", 0, "train.grad_accum: must be >= 1"),
    ("batch_size", 1.5, "train.batch_size: expected an integer"),
    ("lr_generator", "1e-3", "train.lr_generator: expected a number"),
    ("resume", "yes", "train.resume: expected true or false"),
    ("schedule", "exp", "train.schedule: must be one of"),
    ("precision", "fp16", "train.precision: must be one of"),
    ("out_dir", "", "train.out_dir"),
])
def test_train_args_refuse_out_of_range_values(field, value, expect):
    with pytest.raises(UserError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        TrainArgs(**{field: value})


def test_train_config_refuses_a_negative_limit():
    with pytest.raises(UserError, match="limit: must be an integer >= 0"):
        TrainConfig(limit=-1)
    assert TrainArgs(lr_generator=0, warmup_ratio=1, min_lr_ratio=0, max_grad_norm=0).lr_generator == 0


# ------------------------------------------------------------------------------------------------------------------
# run identity

def test_identity_ignores_what_a_resume_may_change_and_names_what_differs():
    feats = make_features(4)
    a = TrainArgs(out_dir="x", max_steps=2)
    b = TrainArgs(out_dir="y", max_steps=9, save_every=3, keep_checkpoints=0, log_every=5, progress=False,
                  threads=2, resume=True, overwrite=False, save_final=False, epochs=4)
    cfg = {"train_data": "a.jsonl", "limit": 0, "model": {"generator": "g"}}
    ia = run_identity(cfg, a.__dict__, feats, 1)
    assert ia == run_identity({**cfg, "train_data": "moved.jsonl"}, b.__dict__, feats, 1)
    other = run_identity({**cfg, "model": {"generator": "h"}}, {**a.__dict__, "lr_reasoner": 1.0}, feats[:3], 2)
    diffs = ckpt_mod.identity_difference(ia, other)
    assert any(d.startswith("model.generator") for d in diffs)
    assert any(d.startswith("train.lr_reasoner 5e-05 -> 1.0") for d in diffs)
    assert any("training data (4 examples" in d for d in diffs) and any("processes 1 -> 2" in d for d in diffs)


def test_fresh_run_refuses_an_out_dir_with_another_run_and_overwrite_replaces_it(tmp_path):
    """The reported failure: an old run's step-N in the default out_dir outranked the new run's checkpoints (which
    pruning then deleted) and a resume adopted it. Now a fresh run is refused; with overwrite the old run goes."""
    feats = make_features(4)
    old = _args(tmp_path, max_steps=5, save_every=5, save_final=True)
    fit(_models(), feats, old, pad_token_id=0)
    run = tmp_path / "run"
    before = _digests(run)
    assert {"step-000005", "final", "log.jsonl", "run.json"} <= {p.name for p in run.iterdir()}
    new = _args(tmp_path, max_steps=2, save_every=1, keep_checkpoints=1, lr_generator=1e-3, seed=3)
    with pytest.raises(UserError, match=r"already holds a training run .*--train.overwrite true"):
        fit(_models(), feats, new, pad_token_id=0)
    assert _digests(run) == before
    fit(_models(), feats, TrainArgs(**{**new.__dict__, "overwrite": True}), pad_token_id=0)
    assert [p.name for _, p in step_checkpoints(run)] == ["step-000002"]  # its own newest, not the old step-5
    assert not (run / "final").exists()
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    # ... and a resume of the new run starts from its own checkpoint
    res = fit(_models(), feats, TrainArgs(**{**new.__dict__, "max_steps": 3, "resume": True}), pad_token_id=0)
    assert res.steps == 3 and len(res.losses) == 1


def test_overwrite_wins_over_resume(tmp_path):
    feats = make_features(4)
    fit(_models(), feats, _args(tmp_path, max_steps=2, save_every=1), pad_token_id=0)
    other = _args(tmp_path, max_steps=1, lr_generator=1e-3, resume=True, overwrite=True)
    res = fit(_models(), feats, other, pad_token_id=0)
    run = tmp_path / "run"
    assert res.steps == 1 and step_checkpoints(run) == []
    assert json.loads((run / "run.json").read_text())["config"]["train"]["lr_generator"] == 1e-3


def test_resume_refuses_another_runs_checkpoint_naming_the_difference(tmp_path):
    feats = make_features(4)
    args = _args(tmp_path, max_steps=2, save_every=2)
    fit(_models(), feats, args, pad_token_id=0)
    run = tmp_path / "run"
    before = _digests(run)
    changed = TrainArgs(**{**args.__dict__, "resume": True, "max_steps": 4, "lr_generator": 3e-2})
    with pytest.raises(UserError, match=r"holds a different run .*train\.lr_generator 0\.01 -> 0\.03"):
        fit(_models(), feats, changed, pad_token_id=0)
    with pytest.raises(UserError, match=r"training data \(4 examples.*-> 3 examples"):
        fit(_models(), feats[:3], TrainArgs(**{**args.__dict__, "resume": True}), pad_token_id=0)
    with pytest.raises(UserError, match=r"model\.fusion\.lam"):
        fit(_models(), feats, TrainArgs(**{**args.__dict__, "resume": True}), pad_token_id=0,
            config={"model": {"fusion": {"lam": 0.2}}})
    assert _digests(run) == before
    # a checkpoint whose own record is another run's is refused too, even when run.json was removed
    (run / "run.json").unlink()
    with pytest.raises(UserError, match="no run.json"):
        fit(_models(), feats, TrainArgs(**{**args.__dict__, "resume": True}), pad_token_id=0)


def test_resume_into_an_empty_folder_starts_fresh_and_a_rerun_continues(tmp_path):
    """What `experiments.runner.run_method` relies on: resume=True on its own folder for the first run and for the
    re-run after a kill (here: a run that stopped between checkpoints, its log ahead of the checkpoint)."""
    feats = make_features(6)
    straight = fit(_models(), feats, _args(tmp_path / "s", max_steps=4), pad_token_id=0)
    args = _args(tmp_path / "r", max_steps=3, save_every=2, resume=True)
    first = fit(_models(), feats, args, pad_token_id=0)  # steps 1-3 logged, checkpoint at 2
    second = fit(_models(), feats, TrainArgs(**{**args.__dict__, "max_steps": 4}), pad_token_id=0)
    assert first.losses[:2] + second.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)
    log = [json.loads(x) for x in (tmp_path / "r" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["loss"] for r in log] == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)


def test_lora_resume_is_exact(tmp_path):
    """LoRA adapters come back from the training state (the step directory holds merged weights)."""
    pytest.importorskip("peft")
    feats = make_features(6)

    def build():
        torch.manual_seed(0)  # LoRA's A matrices are initialised from the global RNG
        return _models(lora_reasoner=True)

    straight = fit(build(), feats, _args(tmp_path / "s", max_steps=4), pad_token_id=0)
    args = _args(tmp_path / "r", max_steps=2, save_every=2)
    first = fit(build(), feats, args, pad_token_id=0)
    second = fit(build(), feats, TrainArgs(**{**args.__dict__, "max_steps": 4, "resume": True}), pad_token_id=0)
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# unreadable checkpoints

@pytest.mark.parametrize("bad", ["generator/model.safetensors", "training_state.pt", "flythinker.json", "generator"])
def test_resume_falls_back_past_an_unusable_newest_checkpoint(tmp_path, capsys, bad):
    feats = make_features(6)
    model = _models()
    straight = fit(model, feats, _args(tmp_path / "s", max_steps=3), pad_token_id=0)
    args = _args(tmp_path / "r", max_steps=2, save_every=1, keep_checkpoints=0)
    fit(_models(), feats, args, pad_token_id=0)
    run = tmp_path / "r" / "run"
    target = run / "step-000002" / bad
    if bad == "generator":
        shutil.rmtree(target)
    elif bad == "flythinker.json":
        target.write_text("{not json")
    else:
        _truncate(target)
    capsys.readouterr()
    resumed_model = _models()
    res = fit(resumed_model, feats, TrainArgs(**{**args.__dict__, "max_steps": 3, "resume": True}), pad_token_id=0)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("flythinker:")]  # not HF's bars
    assert len(err) == 1 and err[0].startswith("flythinker: note:") and str(target) in err[0], err
    assert "step-000001" in err[0]
    assert res.losses == pytest.approx(straight.losses[1:], rel=1e-6, abs=1e-7)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert (run / "step-000002" / "training_state.pt").is_file()  # rewritten whole by the resumed run
    assert FlyThinker.from_pretrained(run / "step-000002") is not None


def test_resume_with_no_usable_checkpoint_fails_naming_the_file(tmp_path):
    feats = make_features(4)
    args = _args(tmp_path, max_steps=1, save_every=1)
    fit(_models(), feats, args, pad_token_id=0)
    run = tmp_path / "run"
    _truncate(run / "step-000001" / "training_state.pt")
    before = _digests(run)
    with pytest.raises(UserError, match=r"cannot resume .*step-000001/training_state\.pt is unusable \(truncated"):
        fit(_models(), feats, TrainArgs(**{**args.__dict__, "resume": True, "max_steps": 2}), pad_token_id=0)
    assert _digests(run) == before


def test_a_failed_save_leaves_the_previous_checkpoint_the_newest(tmp_path, monkeypatch):
    feats = make_features(4)
    args = _args(tmp_path, max_steps=2, save_every=1, keep_checkpoints=0)
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        if "step-000002" in str(f):
            real_save(obj, f, *a, **kw)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError):
        fit(_models(), feats, args, pad_token_id=0)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step-000001" and not (run / "step-000002").exists()
    assert (run / ".tmp-step-000002").is_dir()  # the half-written one is only ever under its temporary name
    res = fit(_models(), feats, TrainArgs(**{**args.__dict__, "resume": True}), pad_token_id=0)
    assert res.steps == 2 and not any(p.name.startswith(".tmp-") for p in run.iterdir())


# ------------------------------------------------------------------------------------------------------------------
# divergence

def _nan_after(model, calls):
    """Make the model's loss NaN from forward call `calls` on (the step after `calls` micro-batches)."""
    forward, seen = model.forward, [0]

    def patched(*a, **kw):
        out = forward(*a, **kw)
        seen[0] += 1
        if seen[0] > calls:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    model.forward = patched
    return model


def test_a_nan_loss_stops_training_before_anything_is_saved(tmp_path):
    feats = make_features(4)
    model = _nan_after(_models(), calls=1)  # step 1 fine, step 2 NaN (batch 2, grad_accum 1)
    args = _args(tmp_path, max_steps=3, save_every=1, save_final=True)
    with pytest.raises(UserError, match=r"diverged at step 2: non-finite loss nan.*step-000001 is intact"):
        fit(model, feats, args, pad_token_id=0)
    run = tmp_path / "run"
    assert [p.name for _, p in step_checkpoints(run)] == ["step-000001"] and not (run / "final").exists()
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())  # stopped before the step
    saved = FlyThinker.from_pretrained(run / "step-000001")
    assert all(torch.isfinite(v).all() for v in saved.state_dict().values())


def test_an_inf_gradient_stops_training(tmp_path):
    model = _models()
    p = next(model.generator.parameters())
    p.register_hook(lambda g: g * math.inf)
    with pytest.raises(UserError, match=r"diverged at step 1: non-finite generator gradient norm (inf|nan).*no "
                                        r"checkpoint was saved"):
        fit(model, make_features(2), _args(tmp_path, max_steps=2, save_final=True), pad_token_id=0)
    assert not (tmp_path / "run" / "final").exists()


def test_a_huge_learning_rate_overflows_into_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="diverged at step 2"):
        fit(_models(), make_features(2), _args(tmp_path, max_steps=3, lr_generator=1e30, lr_reasoner=1e30),
            pad_token_id=0)


# ------------------------------------------------------------------------------------------------------------------
# locking

def test_a_second_run_on_a_locked_out_dir_fails_fast_and_touches_nothing(tmp_path):
    feats = make_features(2)
    args = _args(tmp_path, max_steps=1, save_every=1)
    fit(_models(), feats, args, pad_token_id=0)
    run = tmp_path / "run"
    before = _digests(run)
    with exclusive_lock(run, "test"), pytest.raises(UserError, match=r"train.out_dir .* is in use by another"):
        fit(_models(), feats, TrainArgs(**{**args.__dict__, "resume": True, "max_steps": 2}), pad_token_id=0)
    assert _digests(run) == before


def test_run_lock_is_reentrant_within_a_process(tmp_path):
    with ckpt_mod.run_lock(tmp_path / "o"):
        with ckpt_mod.run_lock(tmp_path / "o"):
            pass
        with pytest.raises(UserError, match="in use"), exclusive_lock(tmp_path / "o", "x"):
            pass


# ------------------------------------------------------------------------------------------------------------------
# loading a saved model that is not whole

@pytest.fixture
def saved_model(tmp_path):
    path = tmp_path / "m"
    _models().save_pretrained(path)
    return path


@pytest.mark.parametrize("damage,exc,expect", [
    (lambda p: (p / "flythinker.json").write_text("{oops"), ValueError, "flythinker.json: invalid JSON"),
    (lambda p: (p / "flythinker.json").write_text('{"has_reasoner": true}'), ValueError,
     "flythinker.json: no 'flythinker' section"),
    (lambda p: (p / "flythinker.json").write_text("[1, 2]"), ValueError, "flythinker.json: no 'flythinker' section"),
    (lambda p: (p / "flythinker.json").write_bytes(b"\xff\xfe{}"), ValueError, "flythinker.json: not UTF-8"),
    (lambda p: shutil.rmtree(p / "generator"), FileNotFoundError, "generator: missing"),
    (lambda p: shutil.rmtree(p / "reasoner"), FileNotFoundError, "reasoner: missing"),
    (lambda p: _truncate(p / "generator" / "model.safetensors"), ValueError, "generator: cannot load the model"),
])
def test_from_pretrained_names_the_bad_file(saved_model, damage, exc, expect):
    damage(saved_model)
    with pytest.raises(exc) as info:
        FlyThinker.from_pretrained(saved_model)
    msg = str(info.value)
    assert expect in msg and str(saved_model) in msg and "\n" not in msg, msg
