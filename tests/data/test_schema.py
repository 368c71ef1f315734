"""Data loading: LongLaMP-shaped files for every task in every format (json, jsonl, jsonl.gz, parquet), HF-style
directories, the hub path (mocked `datasets.load_dataset`), in-memory Datasets, the generic schema, derived ids,
newest-first profiles, every bad-input error, the real ../shared/data sets, and `flythinker data inspect`."""

import gzip
import json
from pathlib import Path

import pytest

from flythinker.cli.main import main
from flythinker.config import ConfigError
from flythinker.data import DataConfig, Example, build_prompt, encode_example, load_examples, query_text
from flythinker.utils import UserError

# ----------------------------------------------------------------------------------------------------------------
# fixtures written by the tests themselves (LongLaMP field names; texts invented here)


def review_record(i: int, user: str = "A1") -> dict:
    return {
        "reviewerId": user,
        "input": f'Generate the review text written by a reviewer who has given an overall rating of "{4 + i % 2}.0" '
                 f'for a product with description "A jazz album number {i} with long solos". '
                 f'The summary of the review text is "Smooth record {i}".',
        "output": f"I played this jazz album {i} every night. The solos are long and warm. Recommended.",
        "profile": [
            {"overall": 5.0, "summary": "Loved the piano", "description": "A piano trio album",
             "reviewText": "The piano sounds great. I listen to it daily."},
            {"overall": 2.0, "summary": "Too loud", "description": "A metal album",
             "reviewText": "The guitars are far too loud for me. I returned it."},
        ],
    }


def abstract_record(i: int, user: str = "Ada Lovelace") -> dict:
    return {
        "name": user,
        "input": f'Generate an abstract for the title "Engines of analysis {i}" using the following items: '
                 f"1. computation, 2. looms.",
        "output": f"We study analytical engines {i}. Our results extend prior machines.",
        "profile": [
            {"id": "p1", "title": "Notes on the engine", "abstract": "We describe the engine. It computes numbers.",
             "year": 1843},
            {"id": "p2", "title": "Looms and cards", "abstract": "Punched cards control looms. We adapt them.",
             "year": 1850},
        ],
    }


def topic_record(i: int, user: str = "redditor1") -> dict:
    return {
        "author": user,
        "input": f"Generate the content for a reddit post about my first marathon {i}",
        "output": f"I finally ran my first marathon {i}. It was hard but worth it.",
        "profile": [
            {"summary": "Training plans", "content": "I trained for months. Long runs on Sunday helped."},
            {"summary": "Cooking pasta", "content": "Boil the water first. Salt it well."},
        ],
    }


RECORDS = {"product_review": review_record, "abstract_generation": abstract_record, "topic_writing": topic_record}


def write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def generic_records() -> list[dict]:
    return [
        {"id": "c1", "user_id": "u1", "input": 'Write the body of the commit message for a commit titled "fix parser".',
         "output": "The parser crashed on empty input. Handle it.",
         "profile": [{"id": "o1", "title": "old", "text": "Older text.", "date": "2020-01-01T10:00:00+02:00"},
                     {"id": "o2", "title": "new", "text": "Newer text.", "date": "2021-06-01T10:00:00+00:00"}]},
        {"id": "c2", "user_id": "u1", "input": "Write something.", "output": "Something.", "profile": []},
        {"id": "c3", "user_id": "u2", "input": "Write more.", "output": "More.",
         "profile": [{"id": "a", "text": "First stored."},
                     {"id": "b", "text": "Second stored.", "date": "2022-01-01"}]},
    ]


# ----------------------------------------------------------------------------------------------------------------
# LongLaMP formats


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".jsonl.gz", ".parquet"])
@pytest.mark.parametrize("task", list(RECORDS))
def test_longlamp_formats_and_task_detection(tmp_path, task, suffix):
    recs = [RECORDS[task](i) for i in range(3)] + [RECORDS[task](9, user="other")]
    path = write_records(tmp_path / f"{task}_user" / f"train{suffix}", recs)
    exs = load_examples(path)
    assert len(exs) == 4 and all(isinstance(e, Example) for e in exs)
    assert {e.task for e in exs} == {task}
    assert len({e.user_id for e in exs}) == 2
    assert len({e.id for e in exs}) == 4
    assert exs[0].input == recs[0]["input"] and exs[0].output == recs[0]["output"]
    assert len(exs[0].profile) == 2
    # parquet unifies struct fields across items; the None fillers are dropped again
    assert all(v is not None for e in exs for it in e.profile for v in it.values())
    # field-based detection when the path says nothing, and an explicit task wins
    neutral = write_records(tmp_path / "x" / f"data{suffix}", recs)
    assert load_examples(neutral)[0].task == task
    assert load_examples(neutral, task="generic")[0].task == "generic"


def test_task_from_path_needs_a_whole_config_name(tmp_path):
    recs = generic_records()
    assert load_examples(write_records(tmp_path / "product_review_notes" / "own.jsonl", recs))[0].task == "generic"
    assert load_examples(write_records(tmp_path / "topic_writing_user-val.jsonl", recs))[0].task == "topic_writing"


def test_topic_items_as_input_output_pairs(tmp_path, tokenizer):
    rec = topic_record(0)
    rec["profile"] = [{"input": "Training plans", "output": "I trained for months."}]
    (ex,) = load_examples(write_records(tmp_path / "t.jsonl", [rec]))
    assert ex.task == "topic_writing"
    assert "[1] Summary: Training plans\nI trained for months." in build_prompt(ex, tokenizer, DataConfig())


def test_abstract_profile_is_sorted_newest_first_by_year(tmp_path):
    path = write_records(tmp_path / "a.jsonl", [abstract_record(0)])
    (ex,) = load_examples(path)
    assert [it["year"] for it in ex.profile] == [1850, 1843]


def test_hf_directory_layout_and_split_selection(tmp_path):
    root = tmp_path / "LongLaMP"
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        write_records(root / "product_review_user" / f"{split}-00000-of-00001.parquet",
                      [review_record(i, user=f"{split}{i}") for i in range(n)])
    write_records(root / "abstract_generation_temporal" / "train-00000-of-00001.parquet", [abstract_record(0)])
    cfg_dir = root / "product_review_user"
    assert len(load_examples(cfg_dir, split="train")) == 3
    assert len(load_examples(cfg_dir, split="dev")) == 2           # dev / validation alias val
    assert len(load_examples(f"{cfg_dir}:validation")) == 2         # DIR:SPLIT shorthand (one string for configs)
    assert load_examples(cfg_dir, split="test")[0].task == "product_review"
    with pytest.raises(UserError, match="several splits.*test.*train.*val"):
        load_examples(cfg_dir)
    with pytest.raises(UserError, match="abstract_generation_temporal/train.*product_review_user/train"):
        load_examples(root, split="train")
    assert load_examples(root / "abstract_generation_temporal")[0].task == "abstract_generation"
    with pytest.raises(UserError, match="no files for split 'nope'"):
        load_examples(cfg_dir, split="nope")


def test_hub_path_uses_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(repo, name=None, split=None, **kw):
        calls.append((repo, name, split))
        return datasets.Dataset.from_list([topic_record(i) for i in range(3)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    exs = load_examples("topic_writing_user:dev")
    assert calls == [("LongLaMP/LongLaMP", "topic_writing_user", "val")]
    assert len(exs) == 3 and exs[0].task == "topic_writing" and exs[0].user_id == "redditor1"
    load_examples("someone/mirror:product_review_temporal", split="train")
    assert calls[-1] == ("someone/mirror", "product_review_temporal", "train")
    with pytest.raises(UserError, match="give a split"):
        load_examples("product_review_user")

    def offline(*a, **k):
        raise ConnectionError("hub unreachable\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"could not load LongLaMP/LongLaMP:abstract_generation_user:test "
                                        r"\(ConnectionError: hub unreachable\)"):
        load_examples("abstract_generation_user:test")


def test_in_memory_dataset_and_datasetdict():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([review_record(i) for i in range(2)])
    exs = load_examples(ds)
    assert len(exs) == 2 and exs[0].task == "product_review" and exs[0].user_id == "A1"
    dd = datasets.DatasetDict({"train": ds, "val": datasets.Dataset.from_list([review_record(5)])})
    assert len(load_examples(dd, split="dev")) == 1
    with pytest.raises(UserError, match="choose a split.*train, val"):
        load_examples(dd)
    assert len(load_examples([review_record(0)], task="product_review")) == 1      # a plain list of dicts


def test_derived_user_and_example_ids_are_stable(tmp_path):
    recs = [review_record(i) for i in range(3)]
    for r in recs:
        del r["reviewerId"]
    recs[2]["profile"] = recs[2]["profile"][:1]
    recs.append(dict(recs[0]))          # an identical record
    path = write_records(tmp_path / "r.jsonl", recs)
    a, b = load_examples(path), load_examples(path)
    assert [e.user_id for e in a] == [e.user_id for e in b]
    assert [e.id for e in a] == [e.id for e in b]
    assert a[0].user_id == a[1].user_id != a[2].user_id      # hash of the profile
    assert a[0].user_id.startswith("u-")
    assert len({e.id for e in a}) == 4 and a[3].id == a[0].id + "-2"


# ----------------------------------------------------------------------------------------------------------------
# generic schema


def test_generic_schema_and_profile_order(tmp_path):
    path = write_records(tmp_path / "own.jsonl.gz", generic_records())
    exs = load_examples(path)
    assert [e.id for e in exs] == ["c1", "c2", "c3"] and {e.task for e in exs} == {"generic"}
    assert [e.user_id for e in exs] == ["u1", "u1", "u2"]
    assert [it["id"] for it in exs[0].profile] == ["o2", "o1"]        # sorted newest first (offset-aware)
    assert exs[1].profile == []                                      # empty profile is valid
    assert [it["id"] for it in exs[2].profile] == ["a", "b"]          # not every item dated: stored order kept
    assert query_text(exs[0], "generic") == exs[0].input


def test_empty_profile_is_non_personalized(tokenizer, tmp_path):
    (ex,) = load_examples(write_records(tmp_path / "e.jsonl", [generic_records()[1]]))
    prompt = build_prompt(ex, tokenizer, DataConfig())
    assert "wrote before" not in prompt and "Write something." in prompt
    feat = encode_example(ex, tokenizer, DataConfig())
    assert feat["response_ids"][-1] == tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------------------------
# bad input: one-line UserErrors naming file + line or field + record id


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = json.dumps(generic_records()[0])
    p.write_text(good + "\n\n" + good + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl line 4: malformed JSON") as e:
        load_examples(p)
    assert "\n" not in str(e.value)
    pj = tmp_path / "bad.json"
    pj.write_text('[\n {"input": "a",\n  "output": }\n]')
    with pytest.raises(UserError, match=r"bad\.json line 3: malformed JSON"):
        load_examples(pj)


def test_json_file_holding_json_lines(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text("".join(json.dumps(r) + "\n" for r in generic_records()))
    assert len(load_examples(p)) == 3


@pytest.mark.parametrize("field", ["input", "output", "profile"])
def test_missing_required_field_names_field_and_id(tmp_path, field):
    recs = generic_records()
    del recs[1][field]
    with pytest.raises(UserError, match=rf"line 2 \(id c2\): missing required field '{field}'"):
        load_examples(write_records(tmp_path / "m.jsonl", recs))


def test_missing_output_allowed_for_unlabelled_data(tmp_path):
    recs = generic_records()
    del recs[0]["output"]
    exs = load_examples(write_records(tmp_path / "u.jsonl", recs), require_output=False)
    assert exs[0].output == ""


def test_missing_field_without_id_names_the_record(tmp_path):
    rec = review_record(0)
    del rec["output"]
    with pytest.raises(UserError, match=r"record 0: missing required field 'output'"):
        load_examples(write_records(tmp_path / "x.json", [rec]))


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(profile="oops"), r"\(id c1\): field 'profile' must be a list"),
    (lambda r: r.update(output=3), r"\(id c1\): field 'output' must be a string"),
    (lambda r: r["profile"].append("text"), r"\(id c1\): profile\[2\] must be an object"),
    (lambda r: r["profile"].append({"title": "no body"}), r"\(id c1\): profile\[2\] is missing its text"),
])
def test_bad_field_types(tmp_path, mutate, message):
    recs = generic_records()
    mutate(recs[0])
    with pytest.raises(UserError, match=message):
        load_examples(write_records(tmp_path / "t.jsonl", recs))


def test_non_object_record(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text("[1, 2]\n")
    with pytest.raises(UserError, match=r"n\.jsonl line 1: expected a JSON object, got list"):
        load_examples(p)


def test_unknown_task_lists_valid_ones(tmp_path):
    path = write_records(tmp_path / "g.jsonl", generic_records())
    with pytest.raises(UserError, match="unknown task 'reviews'; valid: auto, product_review, abstract_generation, "
                                        "topic_writing, generic"):
        load_examples(path, task="reviews")
    with pytest.raises(ConfigError, match="task must be one of auto, product_review"):
        DataConfig(task="reviews")


def test_missing_unsupported_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        load_examples(tmp_path / "d.txt")
    (tmp_path / "c.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"c\.jsonl\.gz: cannot read"):
        load_examples(tmp_path / "c.jsonl.gz")
    (tmp_path / "c.parquet").write_bytes(b"nope")
    with pytest.raises(UserError, match=r"c\.parquet: cannot read parquet"):
        load_examples(tmp_path / "c.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no data files"):
        load_examples(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------------
# the real shared data (skips cleanly when ../shared/data is absent)


def test_shared_commits_and_reviews(shared_data, tokenizer):
    commits = load_examples(shared_data / "commits" / "user" / "dev.jsonl")
    assert len(commits) == 300 and len({e.user_id for e in commits}) == 21
    assert {e.task for e in commits} == {"generic"} and min(len(e.profile) for e in commits) >= 3
    assert load_examples(f"{shared_data / 'commits' / 'user'}:dev")[0].id == commits[0].id
    reviews = load_examples(shared_data / "reviews" / "user" / "dev.jsonl")
    assert len(reviews) == 201 and len({e.user_id for e in reviews}) == 36
    assert {e.task for e in reviews} == {"product_review"}      # profile items carry reviewText/summary/overall
    assert query_text(reviews[0], "product_review") != reviews[0].input
    cfg = DataConfig()
    for ex in commits[:3] + reviews[:3]:
        feat = encode_example(ex, tokenizer, cfg)
        assert feat["response_ids"][-1] == tokenizer.eos_token_id
        assert len(feat["response_ids"]) <= cfg.target_tokens + 1
        assert "wrote before" in build_prompt(ex, tokenizer, cfg)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_data_inspect(tmp_path, capsys, monkeypatch):
    path = write_records(tmp_path / "own.jsonl", generic_records())
    import flythinker.models

    def missing():
        raise ModuleNotFoundError("no default model here")

    monkeypatch.setattr(flythinker.models, "load_default_tokenizer", missing)  # no default model: tiny fallback
    assert main(["data", "inspect", str(path), "--k", "1", "--data.retrieval", "recency", "--example", "2"]) == 0
    out = capsys.readouterr().out
    assert "examples: 3   users: 2" in out
    assert "task: generic (detected)" in out
    assert "tiny test tokenizer" in out and "pass --tokenizer" in out
    assert "p50" in out and "prompt (encoded)" in out
    assert "example 2: id c3" in out and "<|im_start|>assistant" in out and "retrieval=recency k=1" in out
    assert "[1] Second stored." not in out and "[1] First stored." in out     # recency, k=1, stored order
    assert "ending in EOS: data.eos_after_cut" in out and "response (encoded, incl. EOS)" in out
    assert main(["data", "inspect", str(path), "--data.eos_after_cut", "false"]) == 0
    out = capsys.readouterr().out
    assert "no EOS after the cut: data.eos_after_cut" in out and "response (encoded, EOS if whole)" in out


def test_cli_data_inspect_uses_default_tokenizer_and_yaml(tmp_path, capsys, monkeypatch, tokenizer):
    import flythinker.models

    monkeypatch.setattr(flythinker.models, "load_default_tokenizer", lambda: tokenizer)
    path = write_records(tmp_path / "product_review_user" / "val.parquet", [review_record(i) for i in range(2)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1.0\ndata:\n  retrieval: none\n  use_chat_template: false\n")
    assert main(["data", "inspect", str(path), "--config", str(cfg), "--system_prompt", ""]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: default model tokenizer" in out and "task: product_review" in out
    assert "retrieval=none" in out and "wrote before" not in out and "Response:" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["data", "inspect", str(bad), "--tokenizer", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flythinker: error: ") and "bad.jsonl line 1" in err and err.count("\n") == 1
    assert main(["data", "inspect", str(bad), "--task", "nope"]) == 2
    assert "task must be one of" in capsys.readouterr().err
    assert main(["data"]) == 2  # a missing sub-command is argparse's usage error, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flythinker: error: flythinker data")
