"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes over gloo: the DeepSpeed branches of `fit` (accumulation and
clipping from the train section, its engine's loss scaling, the optimizer step inside the closing backward, its
global gradient norm, accelerate's save_state / load_state of the partitioned state) give the same losses and
final weights as one process with the same global batch, and resume exactly.

accelerate 1.16 starts DeepSpeed only on accelerators: on a CPU-only machine its launcher sets the DeepSpeed
environment, but the process state finds no distributed backend and runs one process each. The worker below names
gloo for accelerate's process state before making its Accelerator, after which accelerate initialises DeepSpeed's
own communication (gloo under its CPU accelerator, DS_ACCELERATOR=cpu) and `prepare` builds a real DeepSpeed
engine. The config sets stage3_param_persistence_threshold to 0 so that ZeRO-3 partitions every parameter of
the tiny models, as it does the large ones of a real model (by default it keeps parameters under ~1e5 elements
whole, which would hide a read of a partitioned weight). The GPU launch of configs/accelerate/zero3.yaml is
scripts/gpu_check.sh's job.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # six 2-process launches: about two minutes

ROOT = Path(__file__).parents[2]


def _launch(stage: int, config: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
            str(config), "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(29560 + stage)]


def _config(tmp_path: Path, stage: int) -> Path:
    """accelerate's DeepSpeed config with "auto" where `fit` supplies the value from the train section."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "zero_optimization": zero, "bf16": {"enabled": False}}
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def _run(cmd: list[str], args: list[str], env: dict[str, str]) -> None:
    res = subprocess.run(cmd + [__file__] + args, check=False, env=env, timeout=400, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_matches_one_process_and_resumes_exactly(tmp_path, stage):
    """2 CPU processes x batch 1 under ZeRO-`stage` == 1 process x batch 2 (losses, final weights, the same
    HF-style final/); a run stopped after its step-2 checkpoint and resumed gives the uninterrupted curve."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (scripts/setup.sh installs it)")
    from flythinker.experiments.gpu_check import train_worker
    from tests.integration.sharded_checks import check_matches_one_process_and_resumes

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "DS_ACCELERATOR": "cpu"}
    cmd = _launch(stage, _config(tmp_path, stage))
    one = train_worker(str(tmp_path / "one"), batch_size=2, steps=4)
    r0, r1 = check_matches_one_process_and_resumes(tmp_path, lambda argv: _run(cmd, argv, env), "deepspeed", one)
    assert r0["processes"] == 2
    # read whole although partitioned (ZeRO-3): a slice alone gives 0, which would silently switch fusion off
    assert r0["embedding_norm"] == r1["embedding_norm"] == pytest.approx(one["embedding_norm"], rel=1e-5)


def _deepspeed_accelerator():
    """An Accelerator running the launcher's DeepSpeed config on the CPU (see the module doc)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState

    PartialState(backend="gloo")
    return Accelerator()


def main(argv: list[str]) -> None:
    """One process of the test: OUT_DIR BATCH STEPS [SAVE_EVERY] [resume]."""
    from sharded_checks import worker_main  # run as a script: this folder is sys.path[0]

    worker_main(argv, _deepspeed_accelerator)


if __name__ == "__main__":
    main(sys.argv[1:])
