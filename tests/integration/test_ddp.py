"""Data-parallel training under `accelerate launch` (2 CPU processes, DDP over gloo) equals one process with the
same global batch; a run the main process refuses (its out_dir holds another run) stops every process instead of
leaving the others waiting at a barrier."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_two_process_accelerate_matches_single_process(tmp_path):
    """2 CPU processes x batch 1 == 1 process x batch 2: same losses, same weights on every rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    worker = str(Path(__file__).parent / "train_worker.py")
    # --multi_gpu selects accelerate's torchrun launcher; with no CUDA the processes use DDP over gloo on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    subprocess.run(cmd + [worker, str(ddp), "1"], check=True, env=env, timeout=300, capture_output=True)
    single = tmp_path / "single"
    single.mkdir()
    subprocess.run([sys.executable, worker, str(single), "2"], check=True, env=env, timeout=300, capture_output=True)
    r0, r1 = (json.loads((ddp / f"rank{i}.json").read_text()) for i in (0, 1))
    one = json.loads((single / "rank0.json").read_text())
    assert r0 == r1
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert r0["checksum"] == pytest.approx(one["checksum"], rel=1e-6)
    # A second fresh run into the same out_dir is refused on rank 0; rank 1 must stop too (no hang).
    again = subprocess.run(cmd + [worker, str(ddp), "1"], check=False, env=env, timeout=300, capture_output=True,
                           text=True)
    assert again.returncode != 0
    assert "already holds a training run" in again.stderr
