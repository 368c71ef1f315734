"""`bench serve` (flythinker.experiments.bench_serve): a short load test on the tiny model through a real server
subprocess prints the table and ends with one JSON line holding every level's figures; bad settings are one-line
UserErrors; the percentile helper interpolates."""

from __future__ import annotations

import json

import pytest

from flythinker.experiments.bench_serve import ServeBenchConfig, main, percentile
from flythinker.utils import UserError


def test_bench_serve_on_tiny_prints_a_table_and_one_json_line_last(capsys):
    rc = main(["--model", "tiny", "--clients", "1,2", "--requests", "3", "--max_new_tokens", "6", "--warmup", "1",
               "--items", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.strip().splitlines()
    res = json.loads(lines[-1])
    assert "clients" in out and "tok/s" in out and "throughput ratio 2 clients / 1" in out
    assert res["bench"] == "serve" and res["model"] == "tiny" and res["batching"] == "continuous"
    assert res["errors"] == 0 and [lv["clients"] for lv in res["levels"]] == [1, 2]
    for lv in res["levels"]:
        assert lv["ok"] == 3 and 0 < lv["mean_completion_tokens"] <= 6 and lv["mean_prompt_tokens"] > 0
        assert 0 < lv["ttft_p50_s"] <= lv["latency_p95_s"] and lv["latency_p50_s"] <= lv["latency_p95_s"]
        assert lv["tokens_per_s"] > 0
    assert res["throughput_ratio"] == pytest.approx(res["levels"][1]["tokens_per_s"] / res["levels"][0]["tokens_per_s"],
                                                    rel=1e-2)
    assert res["ratio_clients"] == [2, 1] and len(res["load_avg_before"]) == 3


@pytest.mark.parametrize("kw, match", [
    ({"clients": []}, "--clients"),
    ({"clients": [0, 8]}, "--clients"),
    ({"requests": 0}, "--requests"),
    ({"max_new_tokens": 0}, "--max_new_tokens"),
    ({"batching": "eager"}, "--batching"),
    ({"model": "/nonexistent/ckpt"}, "checkpoint directory"),
])
def test_bad_settings_are_user_errors(kw, match):
    with pytest.raises(UserError, match=match):
        ServeBenchConfig(**kw)


def test_percentile():
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_bench_serve_is_a_bench_verb(capsys):
    """`flythinker bench serve` runs the same load test through the CLI; a bad setting is one line."""
    from flythinker.cli.main import main as cli

    assert cli(["bench", "serve", "--model", "tiny", "--clients", "1", "--requests", "2", "--max_new_tokens", "4",
                "--warmup", "0", "--items", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bench"] == "serve" and [lv["clients"] for lv in res["levels"]] == [1]
    assert cli(["bench", "serve", "--clients", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
