"""`bench train|decode --methods`: every method timed on the same examples, ratios to SFT beside Table 8's cost
model, memory accounting, the Fig. 3 PNG and one JSON line (shape only; no timing assertions)."""

import json

import pytest

from flythinker.cli.main import main
from flythinker.experiments.bench_methods import kv_cache_bytes, predicted_ratio


def test_table8_cost_model():
    assert predicted_ratio("sft", 100, 0, 10, 2) == 1.0
    assert predicted_ratio("flythinker", 100, 100, 10, 2) == pytest.approx(1.2)
    assert predicted_ratio("cot", 100, 50, 10, 2) == pytest.approx(1.5)  # N2 extra Generator steps


def test_kv_cache_bytes_counts_k_and_v_per_layer():
    from flythinker.testing import tiny_lm

    lm = tiny_lm("llama", num_layers=2)
    cfg = lm.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert kv_cache_bytes(lm, 10, 3) == 2 * 2 * heads * head_dim * 10 * 3 * 4


@pytest.mark.parametrize("what", ["train", "decode"])
def test_methods_bench_prints_table_png_and_json(tmp_path, capsys, what):
    png = tmp_path / "fig3.png"
    argv = ["bench", what, "--model", "tiny", "--methods", "flythinker", "--threads", "1", "--plot", str(png)]
    argv += ["--steps", "1", "--examples", "2"] if what == "train" else ["--runs", "1", "--new-tokens", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"sft", "flythinker"}  # SFT is always the reference
    assert any(line.startswith("flythinker") for line in out[:-1])
    if what == "train":
        assert rows["sft"]["train_ratio_to_sft"] == 1.0 and rows["flythinker"]["train_s_per_step"] > 0
        assert rows["flythinker"]["memory_bytes"]["parameters"] > rows["sft"]["memory_bytes"]["parameters"]
        assert rows["flythinker"]["memory_bytes"]["activations"] > 0
    else:
        assert rows["flythinker"]["response_tokens"] == 5 and rows["flythinker"]["extra_steps_n2"] == 5
        assert rows["flythinker"]["decode_ratio_predicted"] > 1
        assert rows["flythinker"]["memory_bytes"]["kv_cache"] > rows["sft"]["memory_bytes"]["kv_cache"]
    assert png.is_file() and png.stat().st_size > 1000


def test_methods_bench_unknown_method_is_one_line(capsys):
    assert main(["bench", "decode", "--model", "tiny", "--methods", "sft,bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0]


def test_methods_bench_builds_every_method_with_the_method_args_given(capsys):
    """--method_args.* sets the methods' own settings (here Coconut's latent count), so the cost of a method can be
    measured at the settings where Table 8 predicts it crosses FlyThinker."""
    argv = ["bench", "train", "--model", "tiny", "--methods", "coconut", "--threads", "1", "--steps", "1",
            "--examples", "1"]
    predicted = {}
    for c in (2, 6):
        assert main([*argv, "--method_args.coconut.latents", str(c)]) == 0
        rows = {r["method"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
        predicted[c] = rows["coconut"]["train_ratio_predicted"]  # Table 8's ratio from the extra c + 2 positions
        assert predicted[c] > 1
    assert predicted[6] > predicted[2]
