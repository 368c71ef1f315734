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
import torch

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


def _weights(final: Path) -> dict[str, torch.Tensor]:
    from flythinker import FlyThinker

    return FlyThinker.from_pretrained(final).state_dict()


def _run(cmd: list[str], args: list[str], env: dict[str, str]) -> None:
    res = subprocess.run(cmd + [__file__] + args, check=False, env=env, timeout=400, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_matches_one_process_and_resumes_exactly(tmp_path, stage):
    """2 CPU processes x batch 1 under ZeRO-`stage` == 1 process x batch 2 (losses, final weights, the same
    HF-style final/); a run stopped after its step-2 checkpoint and resumed gives the uninterrupted curve."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (scripts/setup.sh installs it)")
    from flythinker.experiments.gpu_check import train_worker

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "DS_ACCELERATOR": "cpu"}
    cmd = _launch(stage, _config(tmp_path, stage))
    one = train_worker(str(tmp_path / "one"), batch_size=2, steps=4)
    _run(cmd, [str(tmp_path / "zero"), "1", "4"], env)
    r0, r1 = (json.loads((tmp_path / "zero" / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["engine"] == r1["engine"] == "deepspeed" and r0["processes"] == 2
    assert r0["losses"] == r1["losses"]
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # read whole although partitioned (ZeRO-3): a slice alone gives 0, which would silently switch fusion off
    assert r0["embedding_norm"] == r1["embedding_norm"] == pytest.approx(one["embedding_norm"], rel=1e-5)
    ref = _weights(tmp_path / "one" / "final")
    sharded = _weights(tmp_path / "zero" / "final")
    assert set(sharded) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(sharded[k], v, rtol=1e-4, atol=1e-5, msg=k)
    names = sorted(p.relative_to(tmp_path / "one" / "final").as_posix()
                   for p in (tmp_path / "one" / "final").rglob("*"))
    assert names == sorted(p.relative_to(tmp_path / "zero" / "final").as_posix()
                           for p in (tmp_path / "zero" / "final").rglob("*"))

    _run(cmd, [str(tmp_path / "cut"), "1", "2", "2"], env)
    step2 = tmp_path / "cut" / "step-000002"
    assert (step2 / "engine").is_dir() and (step2 / "generator").is_dir() and (step2 / "training_state.pt").is_file()
    first = json.loads((tmp_path / "cut" / "rank0.json").read_text())["losses"]
    _run(cmd, [str(tmp_path / "cut"), "1", "4", "0", "resume"], env)
    second = json.loads((tmp_path / "cut" / "rank0.json").read_text())["losses"]
    assert first + second == pytest.approx(r0["losses"], rel=1e-6, abs=1e-7)
    resumed = _weights(tmp_path / "cut" / "final")
    for k, v in sharded.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _deepspeed_accelerator():
    """An Accelerator running the launcher's DeepSpeed config on the CPU (see the module doc)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState

    PartialState(backend="gloo")
    return Accelerator()


def main(argv: list[str]) -> None:
    """One process of the test: OUT_DIR BATCH STEPS [SAVE_EVERY] [resume]."""
    from flythinker.experiments.gpu_check import train_worker

    out_dir, batch, steps, *rest = argv
    train_worker(str(Path(out_dir)), int(batch), int(steps), int(rest[0]) if rest else 0, "resume" in rest[1:],
                 accelerator=_deepspeed_accelerator)


if __name__ == "__main__":
    main(sys.argv[1:])
