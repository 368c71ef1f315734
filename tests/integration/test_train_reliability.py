"""kill -9 during training, on tiny models in a subprocess: a kill between checkpoints resumes exactly (same
losses, same final weights, the log without duplicates), a kill in the middle of a save leaves the previous
checkpoint the newest and usable, and a second `train` on a running run's out_dir fails at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flythinker import FlyThinker
from flythinker.training.checkpoint import latest_checkpoint
from flythinker.training.loop import fit
from flythinker.utils import UserError
from tests.training.test_loop import _args, _models, make_features

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
STEPS = 6

# Trains like `_straight` below, each micro-batch slowed down so the test can kill it mid-run. argv: out_dir,
# the step whose checkpoint save hangs (0 = none; the hang starts once training_state.pt is half written).
WORKER = r"""
import sys, time
import torch
torch.set_num_threads(1)
from pathlib import Path
from flythinker.training import checkpoint
from flythinker.training.loop import fit
from tests.training.test_loop import _args, _models, make_features

out, hang_step = Path(sys.argv[1]), int(sys.argv[2])
real_save = torch.save

def save(obj, f, *a, **kw):
    if hang_step and f"step-{hang_step:06d}" in str(f):
        real_save(obj, f, *a, **kw)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])   # as if the kill came half-way through the write
        (out / "HANGING").write_text("1")
        time.sleep(600)
    return real_save(obj, f, *a, **kw)

checkpoint.torch.save = save
model = _models()
slow = model.forward
def forward(*a, **kw):
    time.sleep(0.25)
    return slow(*a, **kw)
model.forward = forward
fit(model, make_features(6), _args(out, max_steps=int(sys.argv[3]), grad_accum=2, save_every=2, keep_checkpoints=0,
                                   save_final=True, resume=True), pad_token_id=0)
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _start(out: Path, hang_step: int = 0, steps: int = STEPS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(out), str(hang_step), str(steps)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the training process ended before {what}: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _log_steps(out: Path) -> list[dict]:
    path = out / "run" / "log.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return recs


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: losses and the final weights."""
    out = tmp_path_factory.mktemp("straight")
    model = _models()
    res = fit(model, make_features(6), _args(out, max_steps=STEPS, grad_accum=2, save_final=True), pad_token_id=0)
    return res.losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _resume_and_compare(out: Path, straight) -> None:
    losses, weights = straight
    model = _models()
    fit(model, make_features(6), _args(out, max_steps=STEPS, grad_accum=2, save_every=2, keep_checkpoints=0,
                                       save_final=True, resume=True), pad_token_id=0)
    log = _log_steps(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in log] == pytest.approx(losses, rel=1e-6, abs=1e-7)
    final = FlyThinker.from_pretrained(out / "run" / "final").state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not any(p.name.startswith((".tmp-", ".old-", ".del-")) for p in (out / "run").iterdir())


def test_kill_between_checkpoints_resumes_exactly(tmp_path, straight):
    proc = _start(tmp_path)
    # step 3 logged: the step-2 checkpoint exists and step 3's work (logged, not checkpointed) will be lost
    _wait(proc, lambda: len(_log_steps(tmp_path)) >= 3, "step 3")
    _kill(proc)
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step-000002" and not (run / "final").exists()
    assert len(_log_steps(tmp_path)) >= 3
    _resume_and_compare(tmp_path, straight)


def test_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path, straight):
    proc = _start(tmp_path, hang_step=4)
    _wait(proc, lambda: (tmp_path / "HANGING").exists(), "the step-4 save")
    _kill(proc)
    run = tmp_path / "run"
    assert not (run / "step-000004").exists(), "a half-written checkpoint is visible under its real name"
    assert (run / ".tmp-step-000004").is_dir()
    assert latest_checkpoint(run).name == "step-000002"
    _resume_and_compare(tmp_path, straight)


def test_a_second_train_on_a_running_out_dir_fails_at_once(tmp_path, capsys):
    from flythinker.cli.main import main
    from flythinker.testing import tiny_lm, tiny_tokenizer

    proc = _start(tmp_path, steps=40)
    try:
        _wait(proc, lambda: len(_log_steps(tmp_path)) >= 1, "step 1")
        with pytest.raises(UserError, match="is in use by another flythinker process"):
            fit(_models(), make_features(6), _args(tmp_path, max_steps=2, resume=True), pad_token_id=0)
        gen = tmp_path / "gen"
        tiny_lm("llama", seed=1, num_layers=2, max_positions=2048).save_pretrained(gen)
        tiny_tokenizer().save_pretrained(gen)
        data = tmp_path / "data.jsonl"
        data.write_text(json.dumps({"id": "a", "user_id": "u", "input": "Write.", "output": "Words here.",
                                    "profile": [{"text": "Old words."}]}) + "\n")
        capsys.readouterr()
        t0 = time.perf_counter()
        rc = main(["train", "--train_data", str(data), "--model.generator", str(gen), "--model.reasoner", "1",
                   "--train.out_dir", str(tmp_path / "run"), "--train.progress", "false", "--train.threads", "1",
                   "--train.resume", "true", "--train.max_steps", "1"])
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert rc == 2 and len(err) == 1 and "is in use by another flythinker process" in err[0], err
        assert time.perf_counter() - t0 < 30
        assert proc.poll() is None, "the running training was disturbed"
    finally:
        _kill(proc)
