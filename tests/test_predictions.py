"""Resumable generation: the model-independent core with a deterministic fake, kills (exception, torn last line at
every byte), what a resume refuses to touch (other people's files, other runs, special files, a held lock), the
reader, and integration runs of `flythinker generate` on a tiny saved checkpoint."""

import json
import os
import pathlib

import pytest

from flythinker.inference import decode_new_tokens
from flythinker.predictions import generate_predictions, read_predictions, scan_predictions
from flythinker.safeio import exclusive_lock
from flythinker.utils import UserError

EXAMPLES = [{"id": f"ex{i:03d}", "user_id": f"u{i % 4}", "input": f"Write text number {i}.",
             "output": f"Réference {i} — ünïcode"} for i in range(23)]


def fake_predict(batch):
    return [f"prediction for {ex['id']}: {ex['input'][::-1]}" for ex in batch]


class Boom(RuntimeError):
    pass


def failing_after(k):
    seen = {"n": 0}

    def fn(batch):
        if seen["n"] + len(batch) > k:
            raise Boom("killed")
        seen["n"] += len(batch)
        return fake_predict(batch)

    return fn


@pytest.fixture
def one_shot(tmp_path):
    path = tmp_path / "one_shot.jsonl"
    generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    return path.read_bytes()


def test_one_shot_file_format(tmp_path, one_shot):
    lines = one_shot.decode().splitlines()
    assert len(lines) == len(EXAMPLES)
    rec = json.loads(lines[5])
    assert list(rec) == ["id", "user_id", "method", "prediction", "reference", "input"]
    assert rec["id"] == "ex005" and rec["user_id"] == "u1" and rec["method"] == "fake"
    assert rec["reference"] == "Réference 5 — ünïcode"  # written as UTF-8, not escaped
    assert "ü" in one_shot.decode()


def test_resume_after_exception_is_identical(tmp_path, one_shot):
    path = tmp_path / "p.jsonl"
    with pytest.raises(Boom):
        generate_predictions(EXAMPLES, failing_after(10), path, batch_size=4, method="fake", progress=False)
    assert len(path.read_bytes().splitlines()) == 8  # two whole batches survived
    calls = []
    stats = generate_predictions(EXAMPLES, lambda b: calls.append(len(b)) or fake_predict(b), path, batch_size=4,
                                 method="fake", progress=False)
    assert stats.skipped == 8 and stats.written == 15 and not stats.repaired
    assert path.read_bytes() == one_shot
    again = generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    assert again.written == 0 and path.read_bytes() == one_shot


def test_torn_last_line_is_dropped_and_rewritten(tmp_path, one_shot):
    path = tmp_path / "p.jsonl"
    lines = one_shot.splitlines(keepends=True)
    torn = b"".join(lines[:6]) + lines[6][:17]  # a kill in the middle of writing line 7
    path.write_bytes(torn)
    scan = scan_predictions(path)
    assert scan.torn and len(scan.ids) == 6 and path.read_bytes() == torn  # the scan changes nothing
    stats = generate_predictions(EXAMPLES, fake_predict, path, batch_size=4, method="fake", progress=False)
    assert stats.repaired and stats.skipped == 6 and stats.written == 17
    assert path.read_bytes() == one_shot


def test_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    generate_predictions(EXAMPLES[:3], fake_predict, path, batch_size=2, method="sft", progress=False)
    with pytest.raises(UserError, match="holds predictions of method 'sft', not 'flythinker'"):
        generate_predictions(EXAMPLES, fake_predict, path, method="flythinker", progress=False)
    with pytest.raises(UserError, match="occurs more than once"):
        generate_predictions(EXAMPLES[:2] * 2, fake_predict, tmp_path / "q.jsonl", progress=False)
    bad = tmp_path / "bad.jsonl"
    good = path.read_text().splitlines()
    bad.write_text(f"{good[0]}\nnot json\n{good[1]}\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not a predictions file .*\(malformed line"):
        generate_predictions(EXAMPLES, fake_predict, bad, method="sft", progress=False)
    with pytest.raises(UserError, match=r"example 'ex000': cannot be written \('prediction' is NoneType"):
        generate_predictions(EXAMPLES, lambda b: [None] * len(b), tmp_path / "n.jsonl", progress=False)
    assert (tmp_path / "n.jsonl").read_bytes() == b""
    with pytest.raises(RuntimeError, match="returned 1 predictions for 2"):
        generate_predictions(EXAMPLES, lambda b: ["x"], tmp_path / "r.jsonl", batch_size=2, progress=False)


RUN = {"checkpoint": "c" * 16, "data": "d" * 16, "decode": "e" * 16}


def _gen(path, examples=EXAMPLES, fn=fake_predict, **kw):
    kw = {"batch_size": 4, "method": "fake", "progress": False, **kw}
    return generate_predictions(examples, fn, path, **kw)


def test_run_fingerprint_is_in_every_line(tmp_path):
    path = tmp_path / "p.jsonl"
    _gen(path, run=RUN)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert all(r["run"] == RUN for r in recs)
    assert list(recs[0]) == ["id", "user_id", "method", "prediction", "reference", "input", "run"]
    assert read_predictions(path).ids == [e["id"] for e in EXAMPLES]  # the reader ignores "run"


def test_a_kill_at_any_byte_resumes_to_the_same_file(tmp_path):
    """Every prefix of a finished file (a SIGKILL can cut a write anywhere, also inside a multi-byte character)
    resumes to exactly the uninterrupted file."""
    full_path = tmp_path / "full.jsonl"
    exs = EXAMPLES[:6]
    _gen(full_path, exs, batch_size=2, run=RUN)
    full = full_path.read_bytes()
    path = tmp_path / "p.jsonl"
    for cut in range(len(full) + 1):
        path.write_bytes(full[:cut])
        _gen(path, exs, batch_size=2, run=RUN)
        assert path.read_bytes() == full, f"cut at byte {cut}"


def test_a_complete_last_record_without_its_newline_is_rewritten(tmp_path, one_shot):
    path = tmp_path / "p.jsonl"
    path.write_bytes(one_shot[:-1])
    stats = _gen(path)
    assert stats.repaired and path.read_bytes() == one_shot


@pytest.mark.parametrize("content, where", [
    (b"a\nimportant", "foreign.txt:1"),                                  # notes: nothing may be cut off
    (b'[{"id": "d0", "input": "x", "output": "y", "profile": []}]', "foreign.txt:1"),  # a one-line JSON dataset
    (b'{"id": "d0", "user_id": "u0", "input": "x", "output": "y", "profile": []}', "foreign.txt:1"),
    (b'{"id": "d0", "user_id": "u0", "input": "x", "output": "y", "profile": []}\n', "foreign.txt:1"),
    (b'{"id": "d0", "user_id": "u0", "input": "half a datas', "foreign.txt:1"),  # a torn line, not ours
    (b"\n", "foreign.txt:1"),
])
def test_a_file_that_is_not_ours_is_refused_and_untouched(tmp_path, content, where):
    path = tmp_path / "foreign.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"{where}: not a predictions file written by flythinker generate"):
        _gen(path)
    assert path.read_bytes() == content


def test_our_records_with_a_foreign_tail_are_refused(tmp_path, one_shot):
    path = tmp_path / "p.jsonl"
    content = one_shot + b"important notes"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"p\.jsonl:24: not a predictions file .*neither a record nor the start"):
        _gen(path)
    assert path.read_bytes() == content
    content = one_shot.replace(b'"input": "Write text number 3."', b'"input": "x", "note": 1')
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"p\.jsonl:4: .*unexpected field 'note'"):
        _gen(path)
    assert path.read_bytes() == content


def test_a_resume_with_another_run_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    _gen(path, EXAMPLES[:8], run=RUN)
    before = path.read_bytes()
    other = {**RUN, "checkpoint": "f" * 16}
    with pytest.raises(UserError, match=r"p\.jsonl:1: it was written by another run: the checkpoint changed "
                                        r"\(file c+, now f+\)"):
        _gen(path, run=other)
    with pytest.raises(UserError, match="the data or prompt settings changed .*; the decode settings changed"):
        _gen(path, run={**RUN, "data": "x", "decode": "y"})
    assert path.read_bytes() == before
    # A file without fingerprints (hand-written, or the experiments') cannot be checked: refused when one is given.
    plain = tmp_path / "plain.jsonl"
    _gen(plain, EXAMPLES[:4])
    with pytest.raises(UserError, match="no 'run' fingerprint"):
        _gen(plain, run=RUN)
    # Without `run` (the model-independent API, the experiments' runner) nothing is checked against it.
    assert _gen(path).skipped == 8


def test_duplicate_ids_in_the_file_are_refused(tmp_path, one_shot):
    path = tmp_path / "p.jsonl"
    lines = one_shot.splitlines(keepends=True)
    content = b"".join(lines[:3] + lines[1:2])
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"p\.jsonl:4: duplicate id 'ex001'"):
        _gen(path)
    assert path.read_bytes() == content


def test_bad_text_in_the_file_names_the_line(tmp_path, one_shot):
    lines = one_shot.splitlines(keepends=True)
    path = tmp_path / "p.jsonl"
    content = lines[0] + lines[1].replace(b"Write", b"Wr\xffte") + lines[2]
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"p\.jsonl:2: not UTF-8 text \(byte 0xff"):
        _gen(path)
    with pytest.raises(UserError, match=r"p\.jsonl:2: not UTF-8"):
        read_predictions(path)
    content = lines[0] + lines[1].replace(b"Write", b"Wr\\ud800te") + lines[2]
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"p\.jsonl:2: contains an invalid character \(a lone surrogate"):
        _gen(path)
    with pytest.raises(UserError, match=r"p\.jsonl:2: contains an invalid character"):
        read_predictions(path)
    assert path.read_bytes() == content


def test_a_resume_streams_the_file_and_never_reads_it_whole(tmp_path, one_shot, monkeypatch):
    path = tmp_path / "p.jsonl"
    path.write_bytes(one_shot[:500])

    def whole(*a, **k):
        raise AssertionError("read whole")

    monkeypatch.setattr(pathlib.Path, "read_bytes", whole)
    monkeypatch.setattr(pathlib.Path, "read_text", whole)
    _gen(path)
    read_predictions(path)
    monkeypatch.undo()
    assert path.read_bytes() == one_shot


def test_an_overlong_line_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    import flythinker.predictions as P

    monkeypatch.setattr(P, "MAX_LINE_BYTES", 100)
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(UserError, match=r"big\.bin:1: line longer than"):
        _gen(path)
    with pytest.raises(UserError, match=r"big\.bin:1: line longer than"):
        read_predictions(path)
    assert path.read_bytes() == b"x" * 1000


def test_special_files_and_bad_parents_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"is a pipe \(FIFO\)"):
        _gen(fifo)  # would block forever opening it, or read it until EOF
    with pytest.raises(UserError, match="not a regular file"):
        read_predictions(fifo)
    with pytest.raises(UserError, match="is a character device"):
        _gen("/dev/full")
    with pytest.raises(UserError, match="is a directory"):
        _gen(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    for out in (tmp_path / "file.txt" / "p.jsonl", tmp_path / "file.txt" / "sub" / "p.jsonl"):
        with pytest.raises(UserError, match=r"file\.txt is not a directory"):
            _gen(out)
    assert (tmp_path / "file.txt").read_text() == "x"


def test_a_held_lock_fails_fast_and_changes_nothing(tmp_path, one_shot):
    path, fresh = tmp_path / "p.jsonl", tmp_path / "fresh.jsonl"
    path.write_bytes(one_shot[:300])
    with exclusive_lock(path, "test"), exclusive_lock(fresh, "test"):
        with pytest.raises(UserError, match=r"predictions file .*p\.jsonl is in use by another flythinker process"):
            _gen(path)
        with pytest.raises(UserError, match=r"fresh\.jsonl is in use"):
            _gen(fresh)
    assert path.read_bytes() == one_shot[:300] and not fresh.exists()
    _gen(path)  # released: the resume completes
    assert path.read_bytes() == one_shot


def test_read_predictions_keeps_hand_written_files(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text('{"id": 1, "prediction": "p", "reference": "r"}\n\n{"id": "2", "prediction": "q", '
                    '"reference": "s", "run": {"x": 1}, "extra": true}\n')
    s = read_predictions(path)
    assert s.ids == ["1", "2"] and s.predictions == ["p", "q"] and s.method == "hand"
    with pytest.raises(UserError, match="prediction file not found"):
        read_predictions(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="not a regular file"):
        read_predictions(tmp_path)


def test_decode_new_tokens_cuts_at_eos(tokenizer):
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert decode_new_tokens(ids + [eos] + ids + [pad, pad], tokenizer, [eos]) == "hello world"
    assert decode_new_tokens(ids, tokenizer, [eos]) == "hello world"


# ----------------------------------------------------------------------------------------------------------------
# integration: tiny checkpoint + data layer + decode loop


def test_generate_cli_on_tiny_checkpoint(tmp_path, capsys):
    from flythinker import FlyThinker
    from flythinker.cli.main import main
    from flythinker.testing import tiny_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = FlyThinker(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1), tokenizer=tok)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps({"id": f"d{i}", "user_id": f"u{i % 2}", "input": f"Write a review of album {i}.",
                                "output": f"I loved album {i}; the melodies are warm.",
                                "profile": [{"text": f"Earlier review {j} about songs."} for j in range(2)]}) + "\n" for i in range(5))
    out = tmp_path / "preds.jsonl"
    argv = ["generate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "2", "--no-progress", "--data.retrieval", "recency", "--data.profile_tokens", "64",
            "--data.query_tokens", "32"]
    assert main(argv) == 0
    full = out.read_bytes()
    recs = [json.loads(x) for x in full.splitlines()]
    assert [r["id"] for r in recs] == [f"d{i}" for i in range(5)]
    assert {r["method"] for r in recs} == {"flythinker"}  # from the checkpoint: it has a Reasoner
    assert recs[0]["reference"] == "I loved album 0; the melodies are warm."
    assert all(isinstance(r["prediction"], str) for r in recs)
    # A kill after the first chunk and mid-way through writing the next: the resumed file is identical (greedy).
    lines = full.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:10])
    assert main(argv) == 0
    assert out.read_bytes() == full
    # Every line records the run; a resume with another checkpoint, data/prompt or decode settings is refused and
    # changes nothing, while --limit and sampling-only flags under greedy decoding are the same run.
    assert {tuple(sorted(r["run"])) for r in recs} == {("checkpoint", "data", "decode")}
    other = tmp_path / "other"
    FlyThinker(tiny_lm("llama", seed=3), tiny_lm("llama", seed=2, num_layers=1), tokenizer=tok).save_pretrained(other)
    capsys.readouterr()
    changes = [(["--max-new-tokens", "7"], "the decode settings changed"),
               (["--data.k", "1"], "the data or prompt settings changed"),
               (["--checkpoint", str(other)], "the checkpoint changed (file")]
    for change, what in changes:
        assert main(argv + change) == 2
        err = capsys.readouterr().err
        assert what in err and "preds.jsonl:1: it was written by another run" in err, err
        assert out.read_bytes() == full
    assert main(argv + ["--limit", "3", "--temperature", "0.3"]) == 0
    assert "0 new, 3 already there" in capsys.readouterr().out
    assert out.read_bytes() == full
    # Same predictions as calling the model directly on the data layer's prompts.
    from flythinker.data import DataConfig, load_examples
    from flythinker.decoding import DecodeConfig
    from flythinker.inference import model_predict_fn

    loaded = FlyThinker.from_pretrained(ckpt).eval()
    exs = load_examples(str(data))
    cfg = DataConfig(retrieval="recency", profile_tokens=64, query_tokens=32)
    fn = model_predict_fn(loaded, loaded.tokenizer, cfg, DecodeConfig(max_new_tokens=6, batch_size=2, seed=0),
                          [e.id for e in exs])
    assert fn(exs[:2]) == [r["prediction"] for r in recs[:2]]
