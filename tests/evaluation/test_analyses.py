"""The paper's analyses over scored methods: Table 12's "Impr." over Non-personalized and App. Q's difficulty levels,
as functions on hand numbers and end to end through `run_evaluation` / `flythinker evaluate`."""

import json

import numpy as np
import pytest

from flythinker.evaluation import metrics as M
from flythinker.evaluation.analyses import (
    difficulty_levels,
    find_difficulty_reference,
    find_nonpers,
    impr_metrics,
    per_example_values,
    relative_improvement,
    subset_values,
)
from flythinker.evaluation.report import EvalConfig, run_evaluation
from flythinker.utils import UserError

# Table 12, Product Review (ROUGE-1, ROUGE-L, BLEU, METEOR, BERTScore) and the paper's printed "Impr." of each row.
PAPER_KEYS = ("rouge1", "rougeL", "bleu", "meteor", "bertscore")
PAPER_NONPERS = dict(zip(PAPER_KEYS, (0.2839, 0.1317, 1.5357, 0.1783, 0.7380)))
PAPER_ROWS = {
    "RAG": ((0.3176, 0.1420, 3.2990, 0.2309, 0.7482), 33.08),
    "SFT": ((0.3551, 0.1536, 3.9112, 0.2309, 0.7681), 45.99),
    "FlyThinker": ((0.3663, 0.1560, 4.3620, 0.2489, 0.7755), 55.24),
}


@pytest.mark.parametrize("name", list(PAPER_ROWS))
def test_relative_improvement_reproduces_table_12(name):
    values, printed = PAPER_ROWS[name]
    got = relative_improvement(dict(zip(PAPER_KEYS, values)), PAPER_NONPERS, PAPER_KEYS)
    assert got == pytest.approx(printed, abs=0.01)  # the paper prints two decimals


def test_relative_improvement_on_hand_numbers_and_its_edge_cases():
    ref = {"a": 1.0, "b": 2.0, "c": 0.0}
    # (2-1)/1 = 100 %, (3-2)/2 = 50 %; c: the reference scores 0, so no ratio exists and it is left out
    assert relative_improvement({"a": 2.0, "b": 3.0, "c": 5.0}, ref, ["a", "b", "c"]) == pytest.approx(75.0)
    assert impr_metrics(ref, ["a", "b", "c"]) == ["a", "b"]
    assert relative_improvement({"a": 0.5, "b": 1.0}, ref, ["a", "b"]) == pytest.approx(-50.0)
    assert relative_improvement({"a": 2.0, "b": None}, ref, ["a", "b"]) is None  # a missing value: no mean
    assert relative_improvement({"a": 2.0}, {"a": float("nan")}, ["a"]) is None   # nothing to compare with
    assert relative_improvement(ref, ref, ["a", "b"]) == 0.0


def test_method_names_recognised_as_the_untrained_rows():
    assert find_nonpers(["SFT", "Non-personalized", "RAG"]) == "Non-personalized"
    assert find_nonpers(["nonpersonalized"]) == "nonpersonalized" and find_nonpers(["non_pers"]) == "non_pers"
    assert find_nonpers(["SFT", "RAG", "personalized"]) is None
    assert find_difficulty_reference(["SFT", "RAG", "Non-pers"]) == "Non-pers"
    assert find_difficulty_reference(["SFT", "rag"]) == "rag"
    assert find_difficulty_reference(["SFT", "FlyThinker"]) is None


def test_difficulty_levels_bucket_counts_and_order():
    # 10 examples: a metric on 0-1 and one on 0-100 (BLEU-like); min-max normalisation puts them on one scale.
    r = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    b = 100 * r                                     # same order, another scale: the aggregate is just r / 0.9
    levels, agg = difficulty_levels({"rouge1": r, "bleu": b})
    assert np.bincount(levels).tolist() == [3, 3, 2, 2]  # uneven counts: the harder levels get one more
    assert agg == pytest.approx(r / 0.9)
    order = np.argsort(r)
    assert levels[order].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # hardest (lowest) first
    # every example of a harder level scores at most every example of an easier one
    for k in range(3):
        assert agg[levels == k].max() <= agg[levels == k + 1].min()
    # a metric equal everywhere does not move the ranking; 8 examples split 2/2/2/2
    lv, _ = difficulty_levels({"m": np.arange(8.0)[::-1], "const": np.ones(8)})
    assert lv.tolist() == [3, 3, 2, 2, 1, 1, 0, 0]


def test_difficulty_levels_ties_keep_file_order_and_too_few_examples_fail():
    levels, _ = difficulty_levels({"m": np.zeros(6)})  # all tied: the first examples are the "hardest"
    assert levels.tolist() == [0, 0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="3 example"):
        difficulty_levels({"m": np.zeros(3)})
    with pytest.raises(ValueError, match="one score per example"):
        difficulty_levels({"a": np.zeros(5), "b": np.zeros(4)})


REFS = ["I loved this album because the melodies are warm and the lyrics are honest.",
        "Overall, the sound is great, the vocals are clear, and I would recommend it to anyone.",
        "This commit fixes a bug in the parser; the previous code did not handle empty input.",
        "The user writes long reviews about music, albums, songs and artists.",
        "Abstract: we propose a method for personalized long-form generation with latent reasoning.",
        "The songs on this record are short, loud and full of honest lyrics about the city.",
        "Refactor the cache so that the parser reads each file only once.",
        "I would not recommend this album: the vocals are weak and the melodies repeat."]
GOOD = ["I loved this album, the melodies are warm and honest.",
        "Overall the sound is great and the vocals are clear; I recommend it.",
        "This commit fixes a parser bug: empty input was not handled.",
        "The user writes reviews about albums and artists.",
        "We propose personalized long-form generation with latent reasoning.",
        "The songs here are short and loud, with honest lyrics.",
        "Refactor the cache: the parser reads each file once.",
        "I would not recommend this album; weak vocals, repeated melodies."]
MID = ["I loved this record.", "The sound is great.", "This commit fixes the parser.", "Reviews about music.",
       "A method for generation.", "Short loud songs about the city.", "Refactor the cache.", "Weak vocals."]
BAD = ["Terrible.", "The parser is slow.", "Music.", "I would not recommend it.", "A method.", "Okay.", "Done.",
       "Fine."]
FAST = ("rouge1", "rougeL", "bleu")


def _write(path, preds, method):
    lines = [json.dumps({"id": f"ex{i}", "user_id": f"u{i % 3}", "prediction": p, "reference": r,
                         "input": f"Write text {i}", "method": method}) for i, (p, r) in enumerate(zip(preds, REFS))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cfg(**kw):
    return EvalConfig(**{"metrics": FAST, "segments": None, "n_boot": 20, **kw})


@pytest.fixture
def files(tmp_path):
    return [_write(tmp_path / "np.jsonl", BAD, "Non-personalized"), _write(tmp_path / "rag.jsonl", MID, "RAG"),
            _write(tmp_path / "fly.jsonl", GOOD, "FlyThinker")]


def test_report_has_impr_over_nonpers_per_method(tmp_path, files):
    rep = run_evaluation(files, tmp_path / "out", _cfg())
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    ref = {k: M.score(BAD, REFS, metrics=FAST)[k] for k in FAST}
    for name, preds in (("RAG", MID), ("FlyThinker", GOOD)):
        mine = M.score(preds, REFS, metrics=FAST)
        by_hand = 100 * np.mean([(mine[k] - ref[k]) / ref[k] for k in FAST])
        assert data["methods"][name]["impr_over_nonpers"] == pytest.approx(by_hand)
    assert data["methods"]["FlyThinker"]["impr_over_nonpers"] > data["methods"]["RAG"]["impr_over_nonpers"] > 0
    assert "impr_over_nonpers" not in data["methods"]["Non-personalized"]  # the reference row: "-" in Table 12
    assert data["info"]["impr_over_nonpers"]["reference"] == "Non-personalized"
    assert data["info"]["impr_over_nonpers"]["metrics"] == list(FAST)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Impr. vs Non-personalized |" in md
    fly = rep.methods["FlyThinker"]["impr_over_nonpers"]
    assert f"| {fly:+.2f}% |" in md and "| Non-personalized | 8 | 0 |" in md


def test_impr_absent_without_a_nonpers_row_and_explicit_flag(tmp_path, files):
    rep = run_evaluation(files[1:], tmp_path / "o1", _cfg())
    assert all("impr_over_nonpers" not in m for m in rep.methods.values())
    assert "impr_over_nonpers" not in rep.info and "Impr." not in (tmp_path / "o1" / "report.md").read_text()
    rep = run_evaluation(files[1:], tmp_path / "o2", _cfg(baseline_nonpers="RAG"))
    assert rep.info["impr_over_nonpers"]["reference"] == "RAG" and rep.methods["FlyThinker"]["impr_over_nonpers"] > 0
    with pytest.raises(UserError, match="--baseline-nonpers 'nope' is not one of the methods"):
        run_evaluation(files, tmp_path / "o3", _cfg(baseline_nonpers="nope"))
    assert not (tmp_path / "o3").exists()  # refused before anything is written


def test_report_has_every_method_per_difficulty_level(tmp_path, files):
    rep = run_evaluation(files, tmp_path / "out", _cfg())
    diff = json.loads((tmp_path / "out" / "metrics.json").read_text())["difficulty"]
    assert diff["reference"] == "Non-personalized"  # auto: the untrained row
    assert [r["level"] for r in diff["levels"]] == ["H0", "H1", "H2", "H3"]
    assert [r["n"] for r in diff["levels"]] == [2, 2, 2, 2]
    assert set(diff["methods"]) == {"Non-personalized", "RAG", "FlyThinker"}
    # the levels are those of the reference's per-example scores, recomputed here by hand
    ref_scores = rep.scores["Non-personalized"]
    levels, _ = difficulty_levels(per_example_values(ref_scores, FAST))
    for k in range(4):
        rows = np.flatnonzero(levels == k).tolist()
        for name, preds in (("FlyThinker", GOOD), ("Non-personalized", BAD)):
            row = diff["methods"][name][k]
            assert row["level"] == f"H{k}" and row["n"] == 2
            direct = M.score([preds[i] for i in rows], [REFS[i] for i in rows], metrics=FAST)
            for m in FAST:  # BLEU is the corpus BLEU of the level's examples
                assert row[m] == pytest.approx(direct[m])
        assert subset_values(ref_scores, rows, FAST)["bleu"] == pytest.approx(diff["methods"]["Non-personalized"][k]
                                                                               ["bleu"])
    # the reference's aggregated score rises with the level
    assert all(a["score_max"] <= b["score_min"] for a, b in zip(diff["levels"], diff["levels"][1:]))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Difficulty levels" in md and "H0 very hard" in md and "| FlyThinker |" in md


def test_difficulty_reference_choice_skip_and_errors(tmp_path, files):
    rep = run_evaluation(files[1:], tmp_path / "o1", _cfg())
    assert rep.difficulty["reference"] == "RAG"                       # no Non-personalized row: RAG
    rep = run_evaluation(files, tmp_path / "o2", _cfg(difficulty_from="FlyThinker"))
    assert rep.difficulty["reference"] == "FlyThinker"
    rep = run_evaluation(files, tmp_path / "o3", _cfg(difficulty_from="none"))
    assert rep.difficulty is None and "Difficulty" not in (tmp_path / "o3" / "report.md").read_text()
    rep = run_evaluation(files[2:], tmp_path / "o4", _cfg())
    assert rep.difficulty is None                                      # only a trained method: nothing to rank by
    with pytest.raises(UserError, match="--difficulty-from 'zzz' is not one of the methods"):
        run_evaluation(files, tmp_path / "o5", _cfg(difficulty_from="zzz"))
    assert not (tmp_path / "o5").exists()
    few = _write(tmp_path / "np3.jsonl", BAD[:3], "Non-personalized")  # 3 examples cannot fill 4 levels
    rep = run_evaluation([few], tmp_path / "o6", _cfg())                # said in the report, not an error
    assert "fewer than the 4 difficulty levels" in rep.difficulty["skipped"]
    assert "Skipped: Non-personalized scored 3" in (tmp_path / "o6" / "report.md").read_text()


def test_evaluate_cli_flags_and_json_line(tmp_path, files, capsys):
    from flythinker.cli.main import main

    out = tmp_path / "out"
    rc = main(["evaluate", *map(str, files), "--out", str(out), "--metrics", "rouge1,bleu", "--segments", "none",
               "--n-boot", "10", "--difficulty-from", "RAG", "--baseline-nonpers", "Non-personalized"])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    last = json.loads(printed[-1])
    assert set(last["impr_over_nonpers"]) == {"RAG", "FlyThinker"}
    assert last["difficulty"] == {"reference": "RAG", "levels": {"H0": 2, "H1": 2, "H2": 2, "H3": 2}}
    assert any(line.startswith("FlyThinker:") and "impr_over_nonpers=+" in line for line in printed)
    cfg = tmp_path / "e.yaml"
    cfg.write_text("metrics: [rouge1]\nsegments: none\nn_boot: 10\ndifficulty_from: off\n")
    assert main(["evaluate", *map(str, files), "--out", str(tmp_path / "o2"), "--config", str(cfg)]) == 0
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["difficulty"] is None
    capsys.readouterr()
    assert main(["evaluate", *map(str, files), "--out", str(tmp_path / "o3"), "--metrics", "rouge1",
                 "--segments", "none", "--difficulty-from", "nobody"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--difficulty-from 'nobody'" in err
