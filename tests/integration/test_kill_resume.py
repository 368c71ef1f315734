"""Kill -9 in the middle of a run, then resume: the result is identical to an uninterrupted run; the killed process's
lock does not block the resume; a resume with another run's fingerprints is refused and changes nothing; and the
same through `flythinker generate` on a tiny checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flythinker.predictions import generate_predictions
from flythinker.utils import UserError
from tests.test_predictions import EXAMPLES, fake_predict

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
RUN = {"checkpoint": "a" * 16, "data": "b" * 16, "decode": "c" * 16}
ENV = {**os.environ, "FLYTHINKER_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_shot(tmp_path):

    path = tmp_path / "once.jsonl"
    generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    return path.read_bytes()


def _start_slow(path: Path, run=None) -> subprocess.Popen:
    script = (
        "import json, sys, time\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from tests.test_predictions import EXAMPLES, fake_predict\n"
        "from flythinker.predictions import generate_predictions\n"
        "def slow(batch):\n"
        "    time.sleep(0.15)\n"
        "    return fake_predict(batch)\n"
        "generate_predictions(EXAMPLES, slow, sys.argv[1], batch_size=4, method='fake', progress=False,\n"
        "                     run=json.loads(sys.argv[3]))\n"
    )
    return subprocess.Popen([sys.executable, "-c", script, str(path), str(ROOT), json.dumps(run)], env=ENV)


def _kill_after(proc: subprocess.Popen, path: Path, lines: int) -> None:
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if path.exists() and len(path.read_bytes().splitlines()) >= lines:
                break
            if proc.poll() is not None:
                pytest.fail("the generating process ended before it could be killed")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)


def test_sigkill_mid_run_then_resume_is_identical(tmp_path, one_shot):
    path = tmp_path / "p.jsonl"
    _kill_after(_start_slow(path), path, 8)
    n_before = len(path.read_bytes().splitlines())
    assert 8 <= n_before < len(EXAMPLES)
    assert (tmp_path / "p.jsonl.lock").exists()  # left by the killed process, but no longer held
    stats = generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    assert stats.written == len(EXAMPLES) - stats.skipped
    assert path.read_bytes() == one_shot


def test_sigkill_then_another_run_is_refused_and_the_same_run_completes(tmp_path):
    once = tmp_path / "once.jsonl"
    generate_predictions(EXAMPLES, fake_predict, once, batch_size=4, method="fake", progress=False, run=RUN)
    path = tmp_path / "p.jsonl"
    _kill_after(_start_slow(path, RUN), path, 4)
    killed = path.read_bytes()
    with pytest.raises(UserError, match="written by another run: the decode settings changed"):
        generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False,
                             run={**RUN, "decode": "d" * 16})
    assert path.read_bytes() == killed  # not even the torn tail was dropped
    generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False, run=RUN)
    assert path.read_bytes() == once.read_bytes()


def _tiny_world(tmp_path: Path, n: int) -> tuple[Path, Path]:
    from flythinker import FlyThinker
    from flythinker.testing import tiny_lm, tiny_tokenizer

    ckpt = tmp_path / "ckpt"
    FlyThinker(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1),
               tokenizer=tiny_tokenizer()).save_pretrained(ckpt)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i:02d}", "user_id": f"u{i % 3}", "input": f"Write about {i}.",
                                        "output": f"Reference {i}.", "profile": [{"text": f"Earlier {i}."}]}) + "\n"
                            for i in range(n)))
    return ckpt, data


def test_sigkill_of_the_generate_verb_then_resume_is_identical(tmp_path):
    ckpt, data = _tiny_world(tmp_path, 24)
    base = [sys.executable, "-m", "flythinker", "generate", "--checkpoint", str(ckpt), "--data", str(data),
            "--max-new-tokens", "16", "--batch-size", "1", "--no-progress", "--data.retrieval", "recency",
            "--data.profile_tokens", "32", "--data.query_tokens", "16"]
    once = tmp_path / "once.jsonl"
    subprocess.run(base + ["--out", str(once)], env=ENV, check=True, capture_output=True, cwd=ROOT)
    path = tmp_path / "p.jsonl"
    proc = subprocess.Popen(base + ["--out", str(path)], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if path.exists() and len(path.read_bytes().splitlines()) >= 3:
                break
            time.sleep(0.005)
        finished = proc.poll() is not None
        os.kill(proc.pid, signal.SIGKILL) if not finished else None
    finally:
        proc.wait(timeout=30)
    if finished:
        pytest.skip("the run finished before it could be killed")
    assert len(path.read_bytes().splitlines()) < 24
    res = subprocess.run(base + ["--out", str(path)], env=ENV, capture_output=True, text=True, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr
    assert path.read_bytes() == once.read_bytes()
