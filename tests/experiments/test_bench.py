"""`flythinker bench decode|train`: output shape (no timing assertions), configs and flags, the timing primitives."""

import json

import torch

from flythinker.cli.main import main


def test_bench_decode_tiny_prints_table_then_json(capsys, monkeypatch):
    threads = torch.get_num_threads()
    rc = main(["bench", "decode", "--model", "tiny", "--prompt-tokens", "12", "--new-tokens", "3",
               "--batch", "1,2", "--runs", "1", "--threads", "2"])
    assert rc == 0
    assert torch.get_num_threads() == threads  # the benchmark restores the caller's thread count
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("per-device" in line for line in lines) and any("same-machine" in line for line in lines)
    result = json.loads(lines[-1])
    for key in ("sft_ms", "sequential_ms", "concurrent_ms", "ratio_concurrent_over_sft", "ratio_sequential_over_sft",
                "process_ms", "ratio_process_over_sft", "ratio_best_over_sft_best", "flop_ratio", "sft_best_ms",
                "best_ms"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert result["batch"] == 1 and result["threads"] == 2 and result["device"] == "cpu"
    assert result["flop_ratio"] > 1 and result["auto_backend"] in ("sequential", "threads")
    assert {r["batch"] for r in result["rows"]} == {1, 2} and set(result["by_batch"]) == {"1", "2"}
    assert isinstance(result["auto_ms"], float) and result["auto_ms"] > 0 and result["best_ms"] > 0
    assert {r["method"] for r in result["rows"] if r["threads"] == "auto"} == {"auto"}  # its own row, per batch
    for row in result["rows"]:
        assert row["method"] in ("sft", "sequential", "concurrent", "process", "auto")
        assert row["prefill_ms"] > 0 and row["decode_ms"] > 0 and row["tokens_per_s"] > 0
    assert {r["backend"] for r in result["rows"] if r["method"] == "process"} == {"process"}


def test_bench_decode_times_one_comparison_alone(capsys):
    """--comparison per-device: only SFT, sequential, threads and process at the per-model core count (no auto)."""
    rc = main(["bench", "decode", "--model", "tiny", "--prompt-tokens", "12", "--new-tokens", "3", "--batch", "1",
               "--runs", "2", "--threads", "2", "--comparison", "per-device"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["comparison"] == "per-device" and result["auto_backend"] is None
    assert {r["comparison"] for r in result["rows"]} == {"per-device"}
    assert sorted(r["method"] for r in result["rows"]) == ["concurrent", "process", "sequential", "sft"]
    assert result["ratio_process_over_sft"] > 0 and result["best_ms"] is None
    assert main(["bench", "decode", "--model", "tiny", "--comparison", "both-ish"]) == 2
    assert "comparison" in capsys.readouterr().err


def test_bench_decode_rejects_bad_flags(capsys):
    assert main(["bench", "decode", "--model", "tiny", "--new-tokens", "1"]) == 2
    assert "--new-tokens" in capsys.readouterr().err


def test_bench_decode_reads_a_config_and_flags_override_it(tmp_path, capsys):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("model: tiny\nprompt_tokens: 8\nnew_tokens: 5\nbatch: [2]\nruns: 1\nthreads: 1\n")
    assert main(["bench", "decode", "--config", str(cfg), "--new_tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "tiny" and result["prompt_tokens"] == 8 and result["new_tokens"] == 3
    assert set(result["by_batch"]) == {"2"}
    cfg.write_text("model: tiny\nprompt_tokns: 8\n")
    assert main(["bench", "decode", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt_tokns" in err[0]


def test_bench_train_tiny_with_config(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: tiny\ntokens: 16\nsteps: 1\nwarmup: 0\nthreads: 1\n")
    assert main(["bench", "train", "--config", str(cfg), "--batch", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "tiny" and result["tokens"] == 16 and result["batch"] == 2
    assert result["sft_s_per_step"] > 0 and result["flythinker_s_per_step"] > 0 and result["flop_ratio"] > 1
    assert result["optimizer_impl"] == "fused"  # auto: the AdamW a CPU training run builds


def test_bench_train_times_the_optimizer_implementation_asked_for(capsys, monkeypatch):
    from flythinker.experiments import bench_train

    built = []
    real = bench_train.bench_optimizer
    monkeypatch.setattr(bench_train, "bench_optimizer",
                        lambda params, lr, impl="auto", device="cpu": built.append(impl) or real(params, lr, impl))
    argv = ["bench", "train", "--model", "tiny", "--tokens", "16", "--steps", "1", "--warmup", "0", "--threads", "1"]
    assert main([*argv, "--optimizer_impl", "for-loop"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["optimizer_impl"] == "for-loop" and built and set(built) == {"for-loop"}


def test_time_generation_times_prefill_and_every_later_step():
    """The shared timing primitive (bench decode and the study's efficiency figures): one prefill figure and one
    figure per decode step after it, with EOS disabled so the count is exact."""
    from flythinker import FlyThinker, FlyThinkerConfig
    from flythinker.experiments.timing import time_generation
    from flythinker.testing import tiny_lm

    gen, rea = tiny_lm(seed=0), tiny_lm(seed=1, num_layers=1)
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=0.5)).eval()
    ids = torch.randint(3, gen.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    prefill, steps = time_generation(model, ids, 5)
    assert prefill > 0 and len(steps) == 4 and all(s > 0 for s in steps)


def test_time_configs_takes_one_prompt_batch_per_configuration():
    import pytest

    from flythinker import FlyThinker
    from flythinker.experiments.timing import time_configs
    from flythinker.testing import tiny_lm

    sft = FlyThinker(tiny_lm(seed=0)).eval()
    a, b = torch.randint(3, 300, (1, 5)), torch.randint(3, 300, (1, 9))
    timed = time_configs([(sft, None, {}), (sft, None, {})], [a, b], new_tokens=3, runs=2)
    assert len(timed) == 2 and all(pre > 0 and ms > 0 for pre, ms in timed)
    with pytest.raises(ValueError, match="2 configurations"):
        time_configs([(sft, None, {}), (sft, None, {})], [a], new_tokens=3, runs=1)
