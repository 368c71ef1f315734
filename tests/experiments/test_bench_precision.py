"""`bench train --precision` and `bench decode --dtype`: one row per precision / dtype, timed interleaved, with the
bf16 / fp32 ratios, and defaults that follow `utils.native_bf16` (shape only; no timing assertions)."""

import json

import pytest

from flythinker.cli.main import main


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return out, json.loads(out[-1])


def test_bench_train_times_each_precision(capsys):
    argv = ["bench", "train", "--model", "tiny", "--tokens", "12", "--steps", "1", "--warmup", "0", "--threads", "1",
            "--precision", "fp32,bf16"]
    assert main(argv) == 0
    out, res = _last_json(capsys)
    assert res["precisions"] == ["fp32", "bf16"] and res["precision"] == "fp32"
    assert set(res["by_precision"]) == {"fp32", "bf16"}
    for p, r in res["by_precision"].items():
        assert r["sft_s_per_step"] > 0 and r["flythinker_s_per_step"] > 0 and r["ratio_flythinker_over_sft"] > 0
        assert r["sft_loss"] > 0 and r["flythinker_loss"] > 0
        assert any(line.startswith(p) and "flythinker" in line for line in out[:-1])
    assert res["sft_s_per_step"] == res["by_precision"]["fp32"]["sft_s_per_step"]  # top level: the first listed
    assert set(res["bf16_over_fp32"]) == {"sft", "flythinker"} and all(v > 0 for v in res["bf16_over_fp32"].values())
    assert res["weights_dtype"] == "float32"
    # bf16 autocast moves the loss a little, not a lot: the same forward in another precision
    fp32, bf16 = res["by_precision"]["fp32"], res["by_precision"]["bf16"]
    assert bf16["sft_loss"] == pytest.approx(fp32["sft_loss"], rel=0.05) and bf16["sft_loss"] != fp32["sft_loss"]


@pytest.mark.parametrize("env, want", [("0", ["fp32"]), ("1", ["fp32", "bf16"])])
def test_bench_train_default_precisions_follow_native_bf16(capsys, monkeypatch, env, want):
    monkeypatch.setenv("FLYTHINKER_NATIVE_BF16", env)
    assert main(["bench", "train", "--model", "tiny", "--tokens", "8", "--steps", "1", "--warmup", "0",
                 "--threads", "1"]) == 0
    _, res = _last_json(capsys)
    assert res["precisions"] == want and ("bf16_over_fp32" in res) == (len(want) == 2)


def test_bench_train_rejects_a_bad_precision(capsys):
    assert main(["bench", "train", "--model", "tiny", "--precision", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "precision" in err[0]
    assert main(["bench", "train", "--model", "tiny", "--precision", "bf16,bf16"]) == 2
    assert "twice" in capsys.readouterr().err


def test_bench_train_methods_times_each_precision(capsys):
    argv = ["bench", "train", "--model", "tiny", "--methods", "flythinker", "--threads", "1", "--steps", "1",
            "--examples", "2", "--precision", "fp32,bf16"]
    assert main(argv) == 0
    out, res = _last_json(capsys)
    assert res["precisions"] == ["fp32", "bf16"]
    rows = {(r["method"], r["precision"]): r for r in res["rows"]}
    assert set(rows) == {(m, p) for m in ("sft", "flythinker") for p in ("fp32", "bf16")}
    for p in ("fp32", "bf16"):
        assert rows["sft", p]["train_ratio_to_sft"] == 1.0 and rows["flythinker", p]["train_s_per_step"] > 0
        assert rows["flythinker", p]["memory_bytes"]["activations"] > 0
    assert rows["flythinker", "bf16"]["train_ratio_to_fp32"] > 0 and "train_ratio_to_fp32" not in rows["sft", "fp32"]
    assert any(line.startswith("flythinker") and " bf16 " in line for line in out[:-1])


def test_bench_decode_times_each_dtype(capsys):
    argv = ["bench", "decode", "--model", "tiny", "--prompt-tokens", "8", "--new-tokens", "3", "--batch", "1",
            "--runs", "1", "--threads", "1", "--dtype", "float32,bfloat16"]
    assert main(argv) == 0
    out, res = _last_json(capsys)
    assert res["dtypes"] == ["float32", "bfloat16"] and res["dtype"] == "float32"
    assert set(res["by_dtype"]) == {"float32", "bfloat16"} and res["by_batch"] == res["by_dtype"]["float32"]
    for dt in ("float32", "bfloat16"):
        methods = {r["method"] for r in res["rows"] if r["dtype"] == dt}
        assert {"sft", "sequential"} <= methods
        assert all(r["decode_ms"] > 0 for r in res["rows"] if r["dtype"] == dt)
        assert res["by_dtype"][dt]["1"]["sft_ms"] > 0 and res["by_dtype"][dt]["1"]["sequential_ms"] > 0
    assert {"sft", "sequential", "concurrent", "process"} == set(res["bf16_over_fp32"])
    assert res["bf16_over_fp32"]["sft"] > 0 and res["bf16_over_fp32"]["sequential"] > 0
    assert any(line.startswith("bfloat16") for line in out[:-1])


@pytest.mark.parametrize("env, want", [("0", ["float32"]), ("1", ["float32", "bfloat16"])])
def test_bench_decode_default_dtypes_follow_native_bf16(capsys, monkeypatch, env, want):
    monkeypatch.setenv("FLYTHINKER_NATIVE_BF16", env)
    assert main(["bench", "decode", "--model", "tiny", "--prompt-tokens", "6", "--new-tokens", "2", "--batch", "1",
                 "--runs", "1", "--threads", "1"]) == 0
    _, res = _last_json(capsys)
    assert res["dtypes"] == want and (res["bf16_over_fp32"] is not None) == (len(want) == 2)


def test_bench_decode_rejects_a_bad_dtype(capsys):
    assert main(["bench", "decode", "--model", "tiny", "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype" in err[0]
