"""The pieces of sharded training that run without a second process: the data plan accelerate shards exactly as
`windows_for_epoch` says, a weightless copy that saves gathered weights in the usual layout (tied weights kept),
the engine settings and refusals, the refusal to resume another engine's checkpoint, the shipped accelerate
configs, and the GPU check's CPU rehearsal and skip."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import flythinker
from flythinker import FlyThinker
from flythinker.training import loop
from flythinker.training.checkpoint import STATE_NAME
from flythinker.training.config import TrainArgs
from flythinker.training.loop import WindowSampler, fit, full_model, meta_copy, planned_windows, windows_for_epoch
from flythinker.utils import UserError

from .test_loop import _args, _models, make_features

ACCELERATE_CONFIGS = sorted((Path(flythinker.__file__).parent / "configs" / "accelerate").glob("*.yaml"))


def test_the_plan_continues_across_epochs_from_a_resume_position():
    args = TrainArgs(batch_size=1, grad_accum=2, seed=3)
    whole = list(planned_windows(5, args, 1, 0, 0, 7))  # 3 windows per epoch
    assert [(e, w) for e, w, _ in whole] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert [win for _, _, win in whole[:3]] == windows_for_epoch(5, 0, args, 1)
    assert list(planned_windows(5, args, 1, 1, 1, 3)) == whole[4:]


def test_accelerate_shards_the_sampler_into_each_ranks_slice():
    """accelerate deals batch k*world + r to process r; the sampler orders slices so that r gets its own slice of
    every global micro-batch, as `windows_for_epoch` prescribes."""
    from accelerate.data_loader import BatchSamplerShard

    args = TrainArgs(batch_size=2, grad_accum=2)
    world = 2

    def plan():
        return planned_windows(7, args, world, 0, 0, 3)

    sampler = WindowSampler(plan, args.batch_size, world)
    micro = [m for _, _, win in plan() for m in win]
    assert len(sampler) == len(micro) * world
    for r in range(world):
        shard = list(BatchSamplerShard(sampler, num_processes=world, process_index=r))
        assert shard == [m[r * 2:(r + 1) * 2] for m in micro]


def test_a_meta_copy_saves_gathered_weights_in_the_same_layout(tmp_path):
    model = _models()
    assert model.generator.lm_head.weight is model.generator.get_input_embeddings().weight  # tied
    skeleton = meta_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}  # what get_state_dict gathers
    full = full_model(skeleton, state)
    assert full.generator.lm_head.weight is full.generator.get_input_embeddings().weight
    full.save_pretrained(tmp_path / "gathered")
    model.save_pretrained(tmp_path / "plain")
    files = sorted(p.relative_to(tmp_path / "plain").as_posix() for p in (tmp_path / "plain").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "gathered").as_posix()
                           for p in (tmp_path / "gathered").rglob("*"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(FlyThinker.from_pretrained(tmp_path / "gathered").eval()(ids).logits,
                           model.eval()(ids).logits)
    state.pop("reasoner.model.norm.weight")
    with pytest.raises(RuntimeError, match=r"lacks 1 tensor.*reasoner\.model\.norm\.weight"):
        full_model(skeleton, state)


def test_a_meta_copy_of_a_zero3_partitioned_model_has_the_full_shapes():
    """A model built under ZeRO-3's zero.Init holds empty slices with the full shape in `ds_shape`; the skeleton
    must have the full shapes, or the gathered state dict would not load into it."""
    model = _models()
    full = {n: p.shape for n, p in model.named_parameters()}
    for p in model.parameters():
        p.ds_shape = p.shape  # as zero.Init leaves them: ds_shape full, the data an empty slice
        p.data = torch.empty(0, dtype=p.dtype)
    skeleton = meta_copy(model)
    assert {n: p.shape for n, p in skeleton.named_parameters()} == full


def test_whole_params_leaves_ordinary_parameters_alone():
    from flythinker.hf import whole_params, zero3_partitioned

    p = torch.nn.Parameter(torch.ones(3))
    assert not zero3_partitioned(p)
    with whole_params(p):  # nothing to gather, deepspeed not needed
        assert torch.equal(p, torch.ones(3))


def test_a_launch_asking_for_a_sharded_engine_that_did_not_start_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="asks for fsdp but accelerate started ddp"):
        loop._configure_engine(None, "ddp", None, None)


def test_fsdp_needs_version_2_and_wraps_the_models_decoder_layers():
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = SimpleNamespace(fsdp_version=2, auto_wrap_policy=transformer_auto_wrap_policy,
                             transformer_cls_names_to_wrap=None)
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    loop._configure_engine(acc, "fsdp", _models(), TrainArgs())
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    plugin.fsdp_version = 1
    with pytest.raises(UserError, match="trains with FSDP2; set fsdp_version: 2"):
        loop._configure_engine(acc, "fsdp", _models(), TrainArgs())


def test_deepspeed_takes_batch_accumulation_and_clipping_from_the_train_section(capsys):
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": "auto"}
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)),
                          is_main_process=True)
    loop._configure_engine(acc, "deepspeed", None, TrainArgs(batch_size=3, grad_accum=4, max_grad_norm=0.5))
    assert ds == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 4, "gradient_clipping": 0.5}
    err = capsys.readouterr().err
    assert "gradient_accumulation_steps 1 replaced by train.grad_accum = 4" in err and "micro_batch" not in err


def test_a_checkpoint_of_another_engine_is_not_resumed(tmp_path):
    feats = make_features(4)
    args = _args(tmp_path, max_steps=1, save_every=1)
    fit(_models(), feats, args, pad_token_id=0)
    state_file = tmp_path / "run" / "step-000001" / STATE_NAME
    state = torch.load(state_file, weights_only=False)
    assert state["engine"] == "ddp"
    torch.save({**state, "engine": "fsdp"}, state_file)
    with pytest.raises(UserError, match="step-000001 was written under the fsdp engine and this run uses ddp"):
        fit(_models(), feats, TrainArgs(**{**args.__dict__, "resume": True, "max_steps": 2}), pad_token_id=0)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_configs_load_and_say_how_to_run_them(path):
    from accelerate.commands.config.config_args import load_config_from_file

    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file configs/accelerate/" + path.name)
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes == 2 and cfg.mixed_precision == "no"
    kind = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "zero3.yaml": "DEEPSPEED"}[path.name]
    assert str(cfg.distributed_type).endswith(kind)
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 3 and cfg.deepspeed_config["zero3_save_16bit_model"]


def test_accelerate_configs_are_shipped():
    assert [p.name for p in ACCELERATE_CONFIGS] == ["ddp.yaml", "fsdp.yaml", "zero3.yaml"]


# ------------------------------------------------------------------------------------------------------------------
# scripts/gpu_check.sh


def test_gpu_check_without_cuda_writes_only_a_skipped_report(tmp_path, monkeypatch):
    from flythinker.experiments import gpu_check

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "skipped" and "no CUDA" in report["reason"] and "checks" not in report


@pytest.mark.slow  # a subprocess importing torch
def test_gpu_check_script_without_cuda_exits_0_with_a_skipped_report(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    out = tmp_path / "report.json"
    script = Path(__file__).parents[2] / "scripts" / "gpu_check.sh"
    res = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["status"] == "skipped" and "no CUDA" in report["reason"]
    assert json.loads(res.stdout.splitlines()[-1]) == {"status": "skipped", "report": str(out)}


def test_gpu_check_cpu_rehearsal_runs_every_check_it_can(tmp_path):
    from flythinker.experiments.gpu_check import main

    out = tmp_path / "r.json"
    assert main(["--out", str(out), "--cpu", "--runs", "1", "--new-tokens", "4"]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "passed" and report["dtype"] == "float32"
    backends = report["checks"]["backends"]
    assert backends["threads"]["equal"] is True and backends["threads"]["tokens"] == 2 * 4
    assert "skipped" in backends["cuda_streams"] and "skipped" in report["checks"]["fsdp"]
    speed = report["checks"]["speed"]
    assert speed["sft_ms_per_token"] > 0 and speed["ratio_sequential_over_sft"] > 0


def test_gpu_check_reports_a_mismatch_where_it_is():
    from flythinker.experiments.gpu_check import _passed, compare_runs, compare_tokens

    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    b = a.clone()
    b[1, 2] = 9
    assert compare_tokens(a, a.clone()) == {"equal": True, "tokens": 6}
    assert compare_tokens(a, b) == {"equal": False, "tokens": 6, "mismatches": 1, "first_mismatch": [1, 2]}
    w = {"x": torch.ones(3)}
    ok = compare_runs({"losses": [1.0, 0.5]}, {"losses": [1.0, 0.5 + 1e-9]}, w, {"x": torch.ones(3)})
    assert ok["losses_equal"] and ok["weights_equal"]
    bad = compare_runs({"losses": [1.0, 0.5]}, {"losses": [1.0, 0.6]}, w, {"x": torch.full((3,), 2.0)})
    assert not bad["losses_equal"] and not bad["weights_equal"] and bad["max_abs_weight_diff"] == pytest.approx(1.0)
    assert not compare_runs(ok, ok, w, {"y": torch.ones(3)})["same_tensors"]
    assert _passed({"a": {"equal": True}, "b": {"skipped": "x"}}) is True
    assert _passed({"a": {"equal": True}, "b": {"equal": False}}) is False


def test_a_resume_that_extends_max_steps_follows_the_new_schedule_at_once(tmp_path):
    """Cosine decay over 4 steps: stopping at 2 (decayed to the floor of a 2-step run) and resuming to 4 gives the
    4-step run's curve, because the first resumed step uses the 4-step schedule, not the learning rates the
    optimizer state was saved with."""
    feats = make_features(6)
    sched = {"schedule": "cosine", "warmup_ratio": 0.05, "min_lr_ratio": 0.1, "grad_accum": 2}
    straight = fit(_models(), feats, _args(tmp_path / "s", max_steps=4, **sched), pad_token_id=0)
    args = _args(tmp_path / "r", max_steps=2, save_every=2, **sched)
    first = fit(_models(), feats, args, pad_token_id=0)
    second = fit(_models(), feats, TrainArgs(**{**args.__dict__, "max_steps": 4, "resume": True}), pad_token_id=0)
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)
    logs = [[json.loads(x) for x in (tmp_path / d / "run" / "log.jsonl").read_text().splitlines()] for d in "rs"]
    # steps 1-2 were logged by the 2-step run (its schedule); from step 3 on the rates are the 4-step run's
    assert [r["lr_generator"] for r in logs[0][2:]] == pytest.approx([r["lr_generator"] for r in logs[1][2:]])
    # the rate after step 3 of 4: warmup 1 step, then cosine from 1 to the 0.1 floor over 3 steps, 2/3 of the way
    assert logs[0][2]["lr_generator"] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(2 * math.pi / 3))))
