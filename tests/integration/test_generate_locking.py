"""Two writers on one predictions file: the second fails fast with one line and changes nothing, the first completes
to the same file as a lone run (no interleaved or duplicate lines)."""

import json
import subprocess
import sys
import time

import pytest

from flythinker.predictions import generate_predictions
from flythinker.safeio import exclusive_lock
from flythinker.utils import UserError
from tests.integration.test_kill_resume import ENV, ROOT, RUN, _start_slow, _tiny_world
from tests.test_predictions import EXAMPLES, fake_predict

pytestmark = pytest.mark.integration


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    once = tmp_path / "once.jsonl"
    generate_predictions(EXAMPLES, fake_predict, once, batch_size=4, method="fake", progress=False, run=RUN)
    path = tmp_path / "p.jsonl"
    proc = _start_slow(path, RUN)
    try:
        deadline = time.time() + 60
        while not (path.exists() and path.read_bytes().count(b"\n") >= 4):
            assert proc.poll() is None and time.time() < deadline, "the first writer ended too early"
            time.sleep(0.02)
        with pytest.raises(UserError, match="is in use by another flythinker process"):
            generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False, run=RUN)
    finally:
        assert proc.wait(timeout=60) == 0
    assert path.read_bytes() == once.read_bytes()
    ids = [json.loads(x)["id"] for x in path.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(EXAMPLES)


def test_the_generate_verb_fails_fast_on_a_held_lock(tmp_path):
    ckpt, data = _tiny_world(tmp_path, 3)
    out = tmp_path / "p.jsonl"
    cmd = [sys.executable, "-m", "flythinker", "generate", "--checkpoint", str(ckpt), "--data", str(data), "--out",
           str(out), "--max-new-tokens", "2", "--no-progress"]
    for existing in (False, True):
        if existing:
            assert subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, check=False).returncode == 0
        before = out.read_bytes() if existing else None
        with exclusive_lock(out, "test"):
            res = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0].startswith("flythinker: error: predictions file") and "is in use" in lines[0]
        assert (out.read_bytes() if existing else out.exists()) == (before if existing else False)
