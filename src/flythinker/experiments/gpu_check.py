"""The GPU check behind scripts/gpu_check.sh: one command that proves on real GPUs what CPU tests cannot, and writes
one JSON report.

Checks: the `cuda_streams` backend (and `two_devices` with two GPUs) decodes exactly the sequential backend's
tokens; ms per new token of FlyThinker against SFT (the Generator alone) in bf16; 2-process training under FSDP2
(and DeepSpeed ZeRO-3 when installed) against one process, including an exact resume; peak GPU memory of each.
Without CUDA the report says "skipped" and the command exits 0. `--cpu` rehearses the same code on the CPU (the
"threads" backend instead of the GPU ones, fp32, tiny models, no training), which is what the test suite runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPORT_VERSION = 1


def _peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------------------------------
# decode backends


def _models(size: str, device: torch.device, dtype: torch.dtype):
    """(FlyThinker, SFT sharing its Generator) on `device` in `dtype`: "medium" = the ~200M + ~57M random pair of
    `bench decode`, "tiny" = the test models."""
    from ..methods.flythinker.config import FlyThinkerConfig
    from ..methods.flythinker.model import FlyThinker
    from ..testing import medium_models, tiny_lm

    if size == "medium":
        g, r, _ = medium_models()
    else:
        g, r = tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1)
    g, r = g.to(device=device, dtype=dtype), r.to(device=device, dtype=dtype)
    return FlyThinker(g, r, FlyThinkerConfig(lam=0.5)).eval(), FlyThinker(g, None).eval()


def compare_tokens(reference: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Whether two decodes (B, N) are token for token equal; else where they first differ."""
    same = reference.shape == other.shape and torch.equal(reference.cpu(), other.cpu())
    out: dict[str, Any] = {"equal": same, "tokens": int(reference.numel())}
    if not same:
        if reference.shape != other.shape:
            out["shapes"] = [list(reference.shape), list(other.shape)]
        else:
            diff = (reference.cpu() != other.cpu()).nonzero()
            out["mismatches"] = int(diff.shape[0])
            out["first_mismatch"] = [int(v) for v in diff[0]]  # (row, position)
    return out


def check_backends(fly: Any, device: torch.device, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """Greedy decodes of one left-padded batch with each concurrent backend against "sequential" on the same
    placement: cuda_streams (one GPU), two_devices (Reasoner moved to a second GPU), threads (CPU)."""
    vocab = fly.generator.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, prompt_tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : prompt_tokens // 4] = 0  # a left-padded row, so padding takes part
    ids, mask = ids.to(device), mask.to(device)

    def decode(backend: str, model: Any = fly) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[],
                                  concurrent=backend)

    results: dict[str, Any] = {}
    _reset_peak(device)
    sequential = decode("sequential")
    if device.type == "cuda":
        results["cuda_streams"] = {**compare_tokens(sequential, decode("cuda_streams")), "peak_mib": _peak_mib(device)}
        if torch.cuda.device_count() >= 2:  # the paper's placement: the Reasoner on its own GPU
            from ..methods.flythinker.model import FlyThinker

            split = FlyThinker(fly.generator, copy.deepcopy(fly.reasoner).to("cuda:1"), fly.config).eval()
            split_seq = decode("sequential", split)
            results["two_devices"] = {**compare_tokens(split_seq, decode("two_devices", split)),
                                      "equal_to_one_device": bool(torch.equal(split_seq.cpu(), sequential.cpu()))}
            del split
        else:
            results["two_devices"] = {"skipped": f"needs 2 GPUs; {torch.cuda.device_count()} present"}
    else:
        results["threads"] = compare_tokens(sequential, decode("threads"))
        results["cuda_streams"] = {"skipped": "needs CUDA"}
        results["two_devices"] = {"skipped": "needs 2 GPUs"}
    return results


def check_speed(fly: Any, sft: Any, device: torch.device, prompt_tokens: int, new_tokens: int,
                runs: int) -> dict[str, Any]:
    """Median ms per new token (batch 1) of SFT, FlyThinker sequential and FlyThinker concurrent (the backend
    "auto" picks here), interleaved; their ratios to SFT; the peak memory of the run."""
    from ..methods.flythinker.decode import resolve_backend
    from .timing import time_configs

    backend = resolve_backend(fly, "auto")
    vocab = fly.generator.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    _reset_peak(device)
    configs = [(sft, None, {}), (fly, None, {"concurrent": "sequential"}), (fly, None, {"concurrent": backend})]
    (_, sft_ms), (_, seq_ms), (_, conc_ms) = time_configs(configs, ids, new_tokens, runs)
    return {"backend": backend, "sft_ms_per_token": round(sft_ms, 3), "sequential_ms_per_token": round(seq_ms, 3),
            "concurrent_ms_per_token": round(conc_ms, 3), "ratio_concurrent_over_sft": round(conc_ms / sft_ms, 3),
            "ratio_sequential_over_sft": round(seq_ms / sft_ms, 3), "peak_mib": _peak_mib(device)}


# ------------------------------------------------------------------------------------------------------------------
# sharded training


def train_worker(out_dir: str, batch_size: int, steps: int, save_every: int = 0, resume: bool = False,
                 accelerator: Any = None) -> dict[str, Any]:
    """Train the tiny FlyThinker pair `steps` optimizer steps (grad_accum 2, 8 examples) under whatever engine
    `accelerate launch` set up (or `accelerator`: an Accelerator, or a function making one after the models),
    saving final/; write and return {"losses", "engine", "peak_mib", "processes"} (and "embedding_norm" after
    training, but for FSDP) as out_dir/rank<r>.json. Every process runs it."""
    from ..methods import ModelArgs, get_method
    from ..testing import random_features, tiny_lm
    from ..training.config import TrainArgs
    from ..training.loop import engine_of, fit

    torch.set_num_threads(1)
    # The models before the Accelerator, as `flythinker train` loads them: under a ZeRO-3 launch accelerate makes
    # transformers build every later model partitioned (zero.Init) whatever zero3_init_flag says.
    # An untied Generator, like the paper's Qwen2.5-7B: ZeRO-3 then releases its input embedding after the lookup,
    # so fusion's read of the table is the partitioned case.
    model = get_method("flythinker").from_lms(tiny_lm("llama", seed=1, tie=False),
                                              tiny_lm("llama", seed=2, num_layers=1), ModelArgs())
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    elif callable(accelerator):
        accelerator = accelerator()
    device = accelerator.device
    _reset_peak(device)
    args = TrainArgs(out_dir=out_dir, max_steps=steps, batch_size=batch_size, grad_accum=2, lr_generator=1e-2,
                     lr_reasoner=1e-2, progress=False, save_final=True, save_every=save_every, keep_checkpoints=0,
                     resume=resume, precision="fp32")
    res = fit(model, random_features(8), args, pad_token_id=0, accelerator=accelerator)
    engine = engine_of(accelerator)
    rec = {"losses": res.losses, "engine": engine, "peak_mib": _peak_mib(device),
           "processes": accelerator.num_processes}
    if engine != "fsdp":
        # Fusion's scale read outside any forward, where ZeRO-3 leaves the embedding table partitioned (FSDP2's
        # sharded DTensors are read inside the root module's forward only).
        rec["embedding_norm"] = float(model.embedding_norm())
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(rec))
    return rec


def compare_runs(reference: dict[str, Any], sharded: dict[str, Any], ref_weights: dict[str, torch.Tensor],
                 weights: dict[str, torch.Tensor], rel: float = 1e-4, atol: float = 1e-5) -> dict[str, Any]:
    """Loss curves and final weights of a sharded run against the one-process reference: losses within `rel`,
    every tensor within |a - b| <= atol + rel * |b| (torch.allclose)."""
    a, b = reference["losses"], sharded["losses"]
    loss_ok = len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-6) for x, y in zip(a, b))
    same_tensors = set(ref_weights) == set(weights) and all(ref_weights[k].shape == weights[k].shape
                                                            for k in ref_weights)
    close, worst = same_tensors, 0.0
    if same_tensors:
        for k, ref in ref_weights.items():
            x, y = weights[k].double(), ref.double()
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
            close = close and torch.allclose(x, y, rtol=rel, atol=atol)
    return {"losses_equal": loss_ok, "same_tensors": same_tensors, "max_abs_weight_diff": worst,
            "weights_equal": close, "reference_losses": a, "losses": b}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from ..methods.flythinker.model import FlyThinker

    return {k: v.float() for k, v in FlyThinker.from_pretrained(run_dir / "final").state_dict().items()}


def check_sharded_training(engine: str, config_file: Path, work: Path, deadline: float) -> dict[str, Any]:
    """2 processes under `config_file` (2 steps saving a checkpoint, then a resume to 4) against one process with
    the doubled batch (4 steps): same losses and final weights, exact resume, the same HF-style final/. Every
    launch must end before `deadline` (time.monotonic())."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", "2", "--main_process_port", "29533", "-m", "flythinker.experiments.gpu_check",
            "--train-worker"]
    ref_dir, run_dir = work / f"{engine}-reference", work / engine
    t0 = time.perf_counter()

    def launch(cmd: list[str]) -> None:
        subprocess.run(cmd, check=True, env=env, timeout=max(5.0, deadline - time.monotonic()), capture_output=True,
                       text=True)

    try:
        launch([sys.executable, "-m", "flythinker.experiments.gpu_check", "--train-worker", str(ref_dir), "2", "4"])
        launch(base + [str(run_dir), "1", "2", "2"])
        first = json.loads((run_dir / "rank0.json").read_text())
        launch(base + [str(run_dir), "1", "4", "0", "resume"])
    except subprocess.CalledProcessError as e:
        return {"passed": False, "error": (e.stderr or "")[-2000:]}
    except subprocess.TimeoutExpired:
        return {"passed": False, "error": "timed out (the script's time budget)"}
    second = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    reference = json.loads((ref_dir / "rank0.json").read_text())
    sharded = {"losses": first["losses"] + second[0]["losses"]}
    result = compare_runs(reference, sharded, _final_weights(ref_dir), _final_weights(run_dir))
    result.update(engine=second[0]["engine"], peak_mib_per_process=[s["peak_mib"] for s in second],
                  reference_peak_mib=reference["peak_mib"], engine_state_saved=(run_dir / "step-000002" /
                                                                                 "engine").is_dir(),
                  seconds=round(time.perf_counter() - t0, 1))
    result["passed"] = bool(result["losses_equal"] and result["weights_equal"] and result["engine"] == engine
                            and result["engine_state_saved"])
    return result


# ------------------------------------------------------------------------------------------------------------------
# the report


def _passed(check: dict[str, Any]) -> bool | None:
    """True / False for a check that ran, None for a skipped one (nested: all parts that ran must pass)."""
    if "skipped" in check:
        return None
    if "passed" in check:
        return bool(check["passed"])
    if "equal" in check:
        return bool(check["equal"])
    parts = [p for p in (_passed(v) for v in check.values() if isinstance(v, dict)) if p is not None]
    return all(parts) if parts else None


def run_checks(cpu: bool = False, model: str = "medium", prompt_tokens: int = 256, new_tokens: int = 64,
               runs: int = 3, train: bool = True, budget_s: float = 420.0, out: Path | None = None) -> dict[str, Any]:
    """All checks; the report dict, also written to `out` after each check (so a run stopped from outside still
    leaves what it measured). Without CUDA (and without `cpu`) only {"status": "skipped", ...}. The training
    checks are skipped once `budget_s` seconds are spent."""
    t0 = time.monotonic()
    deadline = t0 + budget_s
    report: dict[str, Any] = {"version": REPORT_VERSION, "torch": torch.__version__,
                              "cuda_available": torch.cuda.is_available(),
                              "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}

    def save(status: str) -> None:
        report.update(status=status, seconds=round(time.monotonic() - t0, 1))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")

    if not cpu and not torch.cuda.is_available():
        report["reason"] = "no CUDA device here (torch.cuda.is_available() is False)"
        save("skipped")
        return report
    device = torch.device("cpu" if cpu else "cuda:0")
    dtype = torch.float32 if cpu else torch.bfloat16
    report.update(device=str(device) if cpu else torch.cuda.get_device_name(0), dtype=str(dtype).split(".")[-1],
                  model=model, checks={})
    checks = report["checks"]
    fly, sft = _models(model, device, dtype)
    checks["backends"] = check_backends(fly, device, prompt_tokens, new_tokens)
    save("running")
    checks["speed"] = check_speed(fly, sft, device, prompt_tokens, new_tokens, runs)
    save("running")
    del fly, sft
    if cpu or not train:
        why = "CPU rehearsal: accelerate runs FSDP / DeepSpeed on GPUs only" if cpu else "--no-train"
        checks["fsdp"] = {"skipped": why}
        checks["zero3"] = {"skipped": why}
    elif torch.cuda.device_count() < 2:
        checks["fsdp"] = {"skipped": f"needs 2 GPUs; {torch.cuda.device_count()} present"}
        checks["zero3"] = {"skipped": f"needs 2 GPUs; {torch.cuda.device_count()} present"}
    else:
        configs = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
        with tempfile.TemporaryDirectory(prefix="flythinker-gpu-check-") as work:
            checks["fsdp"] = check_sharded_training("fsdp", configs / "fsdp.yaml", Path(work), deadline)
            save("running")
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                checks["zero3"] = {"skipped": "deepspeed is not installed (pip install deepspeed)"}
            else:
                if time.monotonic() > deadline - 60:
                    checks["zero3"] = {"skipped": "the time budget is spent"}
                else:
                    checks["zero3"] = check_sharded_training("deepspeed", configs / "zero3.yaml", Path(work),
                                                             deadline)
    outcome = [p for p in (_passed(c) for c in checks.values()) if p is not None]
    save("passed" if outcome and all(outcome) else "failed")
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m flythinker.experiments.gpu_check --out report.json [--cpu] ...`: run the checks, write the report,
    print it as the last line; exit 0 when passed or skipped, 1 when a check failed. `--train-worker OUT_DIR
    BATCH STEPS [SAVE_EVERY] [resume]` is one process of the training check (launched by it)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-worker"]:
        out_dir, batch, steps, *rest = argv[1:]
        train_worker(out_dir, int(batch), int(steps), int(rest[0]) if rest else 0, "resume" in rest[1:])
        return 0
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    p.add_argument("--cpu", action="store_true", help="rehearse on the CPU (tiny models, threads backend, fp32)")
    p.add_argument("--model", choices=("medium", "tiny"), default=None, help="default: medium (GPU), tiny (--cpu)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 256 (GPU), 16 (--cpu)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (GPU), 8 (--cpu)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-train", action="store_true", help="skip the FSDP / ZeRO-3 training checks")
    p.add_argument("--budget", type=float, default=420.0, help="seconds before the training checks are skipped")
    a = p.parse_args(argv)
    report = run_checks(cpu=a.cpu, model=a.model or ("tiny" if a.cpu else "medium"),
                        prompt_tokens=a.prompt_tokens or (16 if a.cpu else 256),
                        new_tokens=a.new_tokens or (8 if a.cpu else 64), runs=a.runs, train=not a.no_train,
                        budget_s=a.budget, out=Path(a.out))
    print(json.dumps({"status": report["status"], "report": a.out}))
    return 1 if report["status"] == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
