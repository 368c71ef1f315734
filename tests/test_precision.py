"""The one bf16 detector (`utils.native_bf16`) and the dtype settings built on it: `resolve_dtype` (decoding:
bf16 where native), `model.dtype` (loading for training: fp32 unless explicit), `load_checkpoint` and the run
fingerprint under `--dtype auto`, and the server's untrained model."""

import pytest
import torch

from flythinker.data import DataConfig, Example
from flythinker.decoding import DecodeConfig
from flythinker.testing import tiny_lm, tiny_tokenizer
from flythinker.utils import (
    NATIVE_BF16_ENV,
    UserError,
    autocast_dtype,
    cpuinfo_has_bf16,
    native_bf16,
    resolve_dtype,
)


def test_the_env_override_decides_for_every_device(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    assert native_bf16("cpu") and native_bf16(torch.device("cpu")) and native_bf16()
    assert resolve_dtype("auto", "cpu") == torch.bfloat16 and autocast_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert not native_bf16("cpu") and not native_bf16()
    assert resolve_dtype("auto", "cpu") == torch.float32 and autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(UserError, match=NATIVE_BF16_ENV):
        native_bf16("cpu")


def test_explicit_dtypes_ignore_the_hardware(monkeypatch):
    for env in ("0", "1"):
        monkeypatch.setenv(NATIVE_BF16_ENV, env)
        assert resolve_dtype("float32") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
        assert resolve_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="--dtype must be one of auto"):
        resolve_dtype("int8", field="--dtype")


def test_cpu_flags_are_read_from_cpuinfo():
    head = "processor\t: 0\nvendor_id\t: GenuineIntel\n"
    assert cpuinfo_has_bf16(head + "flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n") is True
    assert cpuinfo_has_bf16(head + "flags\t\t: fpu amx_tile amx_bf16 amx_int8\n") is True
    assert cpuinfo_has_bf16(head + "flags\t\t: fpu sse avx2 avx512f avx512_vnni\n") is False  # AVX512 alone: emulated
    assert cpuinfo_has_bf16("processor\t: 0\nFeatures\t: fp asimd bf16\n") is None  # not x86: no flags line


def test_detection_without_override_is_cached_and_matches_the_cpu_flags(monkeypatch):
    from pathlib import Path

    from flythinker import utils

    monkeypatch.delenv(NATIVE_BF16_ENV)
    first = native_bf16("cpu")
    hits = utils._cpu_native_bf16.cache_info().hits
    assert native_bf16("cpu") == first and utils._cpu_native_bf16.cache_info().hits == hits + 1
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and cpuinfo_has_bf16(cpuinfo.read_text(errors="replace")) is not None:
        assert first == cpuinfo_has_bf16(cpuinfo.read_text(errors="replace"))
    assert native_bf16("meta") is False  # neither CUDA nor CPU


def test_model_dtype_loads_fp32_unless_explicit(monkeypatch):
    from flythinker import models
    from flythinker.methods import ModelArgs, get_method

    monkeypatch.setenv(NATIVE_BF16_ENV, "1")  # auto stays fp32 for training even on bf16 hardware
    assert models.load_dtype("auto") == torch.float32 and models.load_dtype("bfloat16") == torch.bfloat16
    assert models.load_dtype(torch.float16) == torch.float16
    with pytest.raises(UserError, match="model.dtype"):
        models.load_dtype("int8")
    with pytest.raises(UserError, match="model.dtype"):
        ModelArgs(dtype="int8")

    def fake_load_models(generator=None, reasoner=None, dtype=torch.float32):
        lm = tiny_lm("llama", seed=1).to(models.load_dtype(dtype))
        return lm, None, tiny_tokenizer()

    monkeypatch.setattr(models, "load_models", fake_load_models)  # Method.build resolves it at call time
    for dtype, want in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        model, _ = get_method("sft").build(ModelArgs(method="sft", dtype=dtype))
        assert {p.dtype for p in model.parameters()} == {want}


def _examples(n=2):
    return [Example(id=f"e{i}", user_id="u", input=f"Write about album {i}.", output="ref",
                    profile=[{"text": f"Earlier review {i} of songs."}]) for i in range(n)]


def test_load_checkpoint_auto_decodes_in_bf16_where_native(saved, monkeypatch):
    from flythinker.inference import Predictor, load_checkpoint

    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    model, tok = load_checkpoint(saved, "auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    texts = Predictor(model, tok, DataConfig(retrieval="recency", k=1, profile_tokens=32, query_tokens=16),
                      DecodeConfig(max_new_tokens=4, batch_size=2)).predict(_examples())
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    model, _ = load_checkpoint(saved, "auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    model, _ = load_checkpoint(saved, "float32")  # explicit: the hardware does not matter
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_run_fingerprint_records_the_dtype_auto_decodes_in(saved, monkeypatch):
    """A predictions file written with auto on bf16 hardware can only be resumed in bf16, never in fp32."""
    from flythinker.inference import run_fingerprint

    exs, cfg, decode = _examples(), DataConfig(retrieval="recency"), DecodeConfig(max_new_tokens=4)

    def fp(dtype):
        return run_fingerprint(saved, exs, cfg, decode, dtype)["decode"]

    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    auto_native = fp("auto")
    assert auto_native == fp("bfloat16") and auto_native != fp("float32")
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert fp("auto") == fp("float32") != auto_native


def test_decode_fingerprint_takes_a_torch_dtype():
    from flythinker.inference import decode_fingerprint

    d = DecodeConfig(max_new_tokens=4)
    assert decode_fingerprint(d, torch.bfloat16) == decode_fingerprint(d, "bfloat16")
    assert decode_fingerprint(d, torch.float32) != decode_fingerprint(d, torch.bfloat16)


def test_serving_an_untrained_model_casts_to_the_serving_dtype(monkeypatch):
    from flythinker import models
    from flythinker.methods import ModelArgs
    from flythinker.serving.config import ServeConfig
    from flythinker.serving.service import load_model

    monkeypatch.setattr(models, "load_models",
                        lambda generator=None, reasoner=None, dtype=None: (tiny_lm("llama", seed=1), None,
                                                                          tiny_tokenizer()))
    for env, dtype, want in (("1", "auto", torch.bfloat16), ("0", "auto", torch.float32),
                             ("1", "float32", torch.float32)):
        monkeypatch.setenv(NATIVE_BF16_ENV, env)
        model, _, name = load_model(ServeConfig(model=ModelArgs(method="sft"), dtype=dtype))
        assert {p.dtype for p in model.parameters()} == {want} and name == "sft-untrained"


def test_generate_auto_decodes_in_the_measured_dtype_and_a_resume_keeps_the_begun_one(saved, tmp_path, monkeypatch):
    """`flythinker generate --dtype auto` asks the measured chooser at --decode.batch_size; a begun --out keeps the
    dtype it was begun in even when the chooser would now pick the other; an explicit dtype is used as given."""
    import json

    from flythinker import inference
    from flythinker.cli.generate import _decode_dtype
    from flythinker.decoding.dtype_choice import DtypeChoice
    from flythinker.inference import decode_fingerprint

    asked = []

    def chooser(dtype):
        def choose(ckpt, name, batch_size):
            asked.append((name, batch_size))
            return DtypeChoice(dtype, "measured", batch_size, {"float32": 2.0, "bfloat16": 1.0})
        return choose

    decode, out = DecodeConfig(max_new_tokens=4, batch_size=3), tmp_path / "preds.jsonl"
    monkeypatch.setattr(inference, "checkpoint_decode_dtype", chooser(torch.bfloat16))
    assert _decode_dtype(saved, "auto", decode, out, 1) == "bfloat16" and asked == [("auto", 3)]
    assert _decode_dtype(saved, "float32", decode, out, 1) == "float32" and len(asked) == 1
    out.write_text(json.dumps({"id": "e0", "run": {"decode": decode_fingerprint(decode, torch.bfloat16)}}) + "\n")
    monkeypatch.setattr(inference, "checkpoint_decode_dtype", chooser(torch.float32))
    assert _decode_dtype(saved, "auto", decode, out, 1) == "bfloat16" and len(asked) == 1
