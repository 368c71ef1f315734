"""The comparison both sharded-engine tests make (test_fsdp.py, test_deepspeed.py): a 2-process run x batch 1
equals one process x batch 2 in losses, final weights and final/'s HF layout, and a run stopped after its step-2
checkpoint and resumed gives the uninterrupted curve and weights. The engine-specific part (how the processes are
launched, which Accelerator they build) stays in each test."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


def _weights(final: Path) -> dict[str, torch.Tensor]:
    from flythinker import FlyThinker

    return FlyThinker.from_pretrained(final).state_dict()


def _layout(final: Path) -> list[str]:
    return sorted(p.relative_to(final).as_posix() for p in final.rglob("*"))


def check_matches_one_process_and_resumes(tmp_path: Path, run: Callable[[list[str]], None], engine: str,
                                          one: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`run(argv)` launches the 2-process worker (OUT_DIR BATCH STEPS [SAVE_EVERY] [resume]); `one` is
    train_worker's record of the 1-process x batch-2 run in tmp_path/one. Returns the two ranks' records."""
    run([str(tmp_path / "sharded"), "1", "4"])
    r0, r1 = (json.loads((tmp_path / "sharded" / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["engine"] == r1["engine"] == engine and r0["losses"] == r1["losses"]
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    ref = _weights(tmp_path / "one" / "final")
    sharded = _weights(tmp_path / "sharded" / "final")
    assert set(sharded) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(sharded[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert _layout(tmp_path / "one" / "final") == _layout(tmp_path / "sharded" / "final")  # the same HF layout

    # stopped after the step-2 checkpoint, then resumed to step 4
    run([str(tmp_path / "cut"), "1", "2", "2"])
    step2 = tmp_path / "cut" / "step-000002"
    assert (step2 / "engine").is_dir() and (step2 / "generator").is_dir() and (step2 / "training_state.pt").is_file()
    first = json.loads((tmp_path / "cut" / "rank0.json").read_text())["losses"]
    run([str(tmp_path / "cut"), "1", "4", "0", "resume"])
    second = json.loads((tmp_path / "cut" / "rank0.json").read_text())["losses"]
    assert first + second == pytest.approx(r0["losses"], rel=1e-6, abs=1e-7)
    resumed = _weights(tmp_path / "cut" / "final")
    for k, v in sharded.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=k)
    return r0, r1


def worker_main(argv: list[str], accelerator: Any) -> None:
    """One process of a sharded test: OUT_DIR BATCH STEPS [SAVE_EVERY] [resume]; `accelerator` as train_worker's."""
    from flythinker.experiments.gpu_check import train_worker

    out_dir, batch, steps, *rest = argv
    train_worker(str(Path(out_dir)), int(batch), int(steps), int(rest[0]) if rest else 0, "resume" in rest[1:],
                 accelerator=accelerator)
