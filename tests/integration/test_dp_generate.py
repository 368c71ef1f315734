"""Data-parallel generation: `accelerate launch --num_processes 2 -m flythinker generate` (2 CPU processes, gloo)
writes per-process shard files and merges them into the one predictions file, byte for byte the single-process
file for greedy decoding; a run killed with shards half written resumes from them. The sharding and merging
functions are tested in-process first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flythinker.predictions import (
    generate_predictions,
    merge_shards,
    shard_examples,
    shard_files,
    shard_path,
)
from flythinker.utils import UserError
from tests.integration.test_kill_resume import _tiny_world
from tests.test_predictions import EXAMPLES, fake_predict

ROOT = Path(__file__).parents[2]
RUN = {"checkpoint": "a" * 16, "data": "b" * 16, "decode": "c" * 16}


def test_shards_are_whole_chunks_dealt_round_robin():
    ex = list(range(11))
    assert shard_examples(ex, 2, 0, 3) == [0, 1, 6, 7]
    assert shard_examples(ex, 2, 1, 3) == [2, 3, 8, 9]
    assert shard_examples(ex, 2, 2, 3) == [4, 5, 10]
    assert sorted(shard_examples(ex, 4, 0, 2) + shard_examples(ex, 4, 1, 2)) == ex
    with pytest.raises(ValueError, match="rank"):
        shard_examples(ex, 2, 3, 3)


def test_merged_shards_equal_one_writer_and_resume_from_what_is_there(tmp_path):
    once = tmp_path / "once.jsonl"
    generate_predictions(EXAMPLES, fake_predict, once, batch_size=4, method="fake", progress=False, run=RUN)
    out = tmp_path / "p.jsonl"
    # --out already holds the first chunk (e.g. an interrupted single-process run): the shards skip it
    generate_predictions(EXAMPLES[:4], fake_predict, out, batch_size=4, method="fake", progress=False, run=RUN)
    done = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    for r in range(2):
        stats = generate_predictions(shard_examples(EXAMPLES, 4, r, 2), fake_predict, shard_path(out, r, 2),
                                     batch_size=4, method="fake", progress=False, run=RUN, skip=done)
        assert stats.skipped == (4 if r == 0 else 0)
    assert [w for _, w, _ in shard_files(out)] == [2, 2]
    assert merge_shards(out, [e["id"] for e in EXAMPLES], 2, method="fake", run=RUN) == len(EXAMPLES)
    assert out.read_bytes() == once.read_bytes()
    assert shard_files(out) == [] and not shard_path(out, 0, 2).with_name(shard_path(out, 0, 2).name + ".lock").exists()


def test_merge_refuses_a_missing_shard_or_example_and_changes_nothing(tmp_path):
    out = tmp_path / "p.jsonl"
    ids = [e["id"] for e in EXAMPLES]
    generate_predictions(shard_examples(EXAMPLES, 4, 0, 2), fake_predict, shard_path(out, 0, 2), batch_size=4,
                         method="fake", progress=False, run=RUN)
    with pytest.raises(UserError, match=r"shard-1-of-2\.jsonl: missing"):
        merge_shards(out, ids, 2, method="fake", run=RUN)
    shard_path(out, 1, 2).write_text("")
    with pytest.raises(UserError, match="is in no shard"):
        merge_shards(out, ids, 2, method="fake", run=RUN)
    with pytest.raises(UserError, match="another run"):
        merge_shards(out, ids, 2, method="fake", run={**RUN, "decode": "d" * 16})
    assert not out.exists() and shard_path(out, 0, 2).exists()


def _generate_cmd(ckpt: Path, data: Path, out: Path) -> list[str]:
    return ["generate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "2", "--no-progress", "--data.retrieval", "recency", "--data.profile_tokens", "32"]


@pytest.mark.integration
@pytest.mark.slow  # two 2-process launches
def test_two_process_generate_equals_one_process_and_resumes_from_shards(tmp_path, capsys):
    from flythinker.cli.main import main

    ckpt, data = _tiny_world(tmp_path, 9)
    once = tmp_path / "once.jsonl"
    assert main(_generate_cmd(ckpt, data, once)) == 0
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLYTHINKER_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29521", "-m", "flythinker"]
    out = tmp_path / "dp.jsonl"
    res = subprocess.run(launch + _generate_cmd(ckpt, data, out), env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == once.read_bytes()
    assert shard_files(out) == [] and "9 new, 0 already there, 9 total, from 2 processes" in res.stdout

    # As if killed: each process's shard holds its first chunk and a torn start of the next line.
    lines = once.read_bytes().splitlines(keepends=True)
    resumed = tmp_path / "resumed.jsonl"
    for r in range(2):
        mine = shard_examples(lines, 2, r, 2)
        shard_path(resumed, r, 2).write_bytes(b"".join(mine[:2]) + mine[2][:15])
    res = subprocess.run(launch + _generate_cmd(ckpt, data, resumed), env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert resumed.read_bytes() == once.read_bytes()
    assert "5 new, 4 already there, 9 total, from 2 processes (dropped a torn last line first)" in res.stdout
