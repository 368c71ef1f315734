"""Sharded training (FSDP2) on 2 CPU processes over gloo equals one process with the same global batch, writes the
usual HF-style model directory plus the sharded engine state, and resumes exactly.

accelerate 1.15 starts FSDP only on accelerators (AcceleratorState selects FSDP under its GPU-type branch; on a
CPU the same launch runs DDP, which `fit` refuses). So the worker below builds its Accelerator with an FSDP2 plugin
and switches accelerate's state to FSDP itself: torch's FSDP2 then runs over gloo through accelerate's own prepare,
no_sync, clip_grad_norm_, get_state_dict and save_state / load_state, which is the code path a GPU launch of
configs/accelerate/fsdp.yaml takes. The real launch is scripts/gpu_check.sh's job.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # three 2-process launches: about a minute

ROOT = Path(__file__).parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519"]


def _fsdp_accelerator():
    """An Accelerator running FSDP2 on the CPU (see the module doc)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            state_dict_type="SHARDED_STATE_DICT", reshard_after_forward=True)
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    # Both singletons: every AcceleratorState() re-reads the distributed type from PartialState's shared state.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


def _run(args: list[str], env: dict[str, str]) -> None:
    res = subprocess.run(LAUNCH + [__file__] + args, check=False, env=env, timeout=300, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_process_fsdp_matches_one_process_and_resumes_exactly(tmp_path):
    """2 CPU processes x batch 1 under FSDP2 == 1 process x batch 2 (losses, final weights); a run stopped after
    its step-2 checkpoint and resumed gives the uninterrupted curve and weights."""
    from flythinker.experiments.gpu_check import train_worker
    from tests.integration.sharded_checks import check_matches_one_process_and_resumes

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = train_worker(str(tmp_path / "one"), batch_size=2, steps=4)
    check_matches_one_process_and_resumes(tmp_path, lambda argv: _run(argv, env), "fsdp", one)


def main(argv: list[str]) -> None:
    """One process of the test: OUT_DIR BATCH STEPS [SAVE_EVERY] [resume], training under FSDP2 on the CPU."""
    sys.path.insert(0, str(ROOT / "src"))
    from sharded_checks import worker_main  # run as a script: this folder is sys.path[0]

    worker_main(argv, _fsdp_accelerator())


if __name__ == "__main__":
    main(sys.argv[1:])
