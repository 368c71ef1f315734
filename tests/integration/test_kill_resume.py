"""Kill -9 in the middle of a run, then resume: the result is identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flythinker.predictions import generate_predictions
from tests.test_predictions import EXAMPLES, fake_predict

pytestmark = pytest.mark.integration


@pytest.fixture
def one_shot(tmp_path):

    path = tmp_path / "once.jsonl"
    generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    return path.read_bytes()


def test_sigkill_mid_run_then_resume_is_identical(tmp_path, one_shot):
    path = tmp_path / "p.jsonl"
    script = (
        "import sys, time\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from tests.test_predictions import EXAMPLES, fake_predict\n"
        "from flythinker.predictions import generate_predictions\n"
        "def slow(batch):\n"
        "    time.sleep(0.15)\n"
        "    return fake_predict(batch)\n"
        "generate_predictions(EXAMPLES, slow, sys.argv[1], batch_size=4, method='fake', progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(Path(__file__).parents[2])])
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if path.exists() and len(path.read_bytes().splitlines()) >= 8:
                break
            if proc.poll() is not None:
                pytest.fail("the generating process ended before it could be killed")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    n_before = len(path.read_bytes().splitlines())
    assert 8 <= n_before < len(EXAMPLES)
    stats = generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    assert stats.written == len(EXAMPLES) - stats.skipped
    assert path.read_bytes() == one_shot


