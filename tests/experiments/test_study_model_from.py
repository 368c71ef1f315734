"""A study row with `model_from` decodes another row's trained model with its own decoding (a decoding lever on
the very model it is compared with): no second training, the same checkpoint in its predictions' fingerprint, the
shared training's cost in its efficiency row; misuse is a one-line error before anything runs."""

import json

import pytest

from flythinker.cli.main import main
from flythinker.testing import study_yaml

# the 1-gram ban keeps the tiny model from repeating one whitespace token (all SFT writes), so the two decodings
# visibly differ
COPY = {"name": "SFT+copy", "model_from": "SFT",
        "overrides": {"decode.copy_bonus": 50.0, "decode.copy_ngram": 2, "decode.no_repeat_ngram_size": 1}}


@pytest.fixture
def study(tmp_path, tokenizer):
    from flythinker.experiments.synthetic import write_demo_dataset
    from flythinker.testing import tiny_lm

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, num_layers=1, max_positions=512).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    write_demo_dataset(tmp_path / "data", seed=1, n_users_train=2, n_users_test=2, items_per_user=6)

    def write(**sections) -> str:
        sections.setdefault("decode", {"max_new_tokens": 6, "batch_size": 2})
        return study_yaml(tmp_path / "study.yaml", tmp_path / "data", tmp_path / "out", gen_dir, **sections)

    return write


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_model_from_row_decodes_the_named_rows_model_with_its_own_decoding(tmp_path, study, capsys):
    assert main(["study", "--config", study(variants=[COPY])]) == 0
    log = capsys.readouterr().out
    out = tmp_path / "out" / "user"
    assert "[SFT+copy] decoding the trained model of SFT" in log and "[SFT+copy] training" not in log
    assert not (out / "SFT_copy" / "train").exists()  # one training, SFT's
    sft, copy = _lines(out / "SFT" / "predictions.jsonl"), _lines(out / "SFT_copy" / "predictions.jsonl")
    assert [r["id"] for r in copy] == [r["id"] for r in sft]
    # the same trained model (checkpoint fingerprint) and data; another decoding
    assert {r["run"]["checkpoint"] for r in copy} == {r["run"]["checkpoint"] for r in sft}
    assert {r["run"]["data"] for r in copy} == {r["run"]["data"] for r in sft}
    assert {r["run"]["decode"] for r in copy}.isdisjoint({r["run"]["decode"] for r in sft})
    # its own decoding: the outputs differ from SFT's
    assert [r["prediction"] for r in copy] != [r["prediction"] for r in sft]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["splits"]["user"]
    assert set(summary["metrics"]) == {"SFT", "SFT+copy"}
    eff = {r["method"]: r for r in summary["efficiency"]}
    assert eff["SFT+copy"]["train_s_per_step"] == eff["SFT"]["train_s_per_step"] > 0
    assert eff["SFT+copy"]["decode_ms_per_token"] > 0
    assert json.loads((out / "SFT_copy" / "timing.json").read_text())["model_from"] == "SFT"
    assert set(summary["comparisons"]["vs_baseline"]) == {"SFT+copy"}

    # a re-run reuses both rows' predictions and SFT's training
    assert main(["study", "--config", study(variants=[COPY])]) == 0
    log = capsys.readouterr().out
    assert "[SFT] reusing trained model" in log and "[SFT+copy] 0 predictions written (2 reused)" in log


def test_a_model_from_row_whose_model_is_not_trained_yet_says_so_in_one_line(tmp_path, study, capsys):
    assert main(["study", "--config", study(variants=[COPY], only=["SFT+copy"])]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decodes the trained model of row 'SFT'" in err[0] and "--only" in err[0]
    assert not (tmp_path / "out" / "user" / "SFT_copy" / "predictions.jsonl").exists()


@pytest.mark.parametrize("variant, message", [
    ({"name": "X", "model_from": "FT"}, "model_from 'FT' is not a row listed before it"),
    ({"name": "X", "model_from": "SFT", "overrides": {"train.lr_generator": 1e-3}},
     "only decode.* overrides can be its own; got train.lr_generator"),
    ({"name": "X", "model_from": "SFT", "method": "flythinker"}, "drop its method"),
    ({"name": "X", "model_from": "Copy-latest"}, "must be a row that trains its own model"),
    ({"name": "X", "model_from": "SFT", "overrides": {"decode.copy_bonnus": 1}}, "unknown key 'copy_bonnus'"),
])
def test_model_from_misuse_is_a_one_line_error_before_anything_runs(tmp_path, study, capsys, variant, message):
    assert main(["study", "--config", study(methods=["copy_latest", "sft"], variants=[variant])]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_ablation_point_with_model_from_decodes_an_earlier_points_model_on_the_tune_pool(tmp_path, study, capsys):
    """A decoding lever chosen on the tune pool (e.g. a length floor) needs no second training there either: the
    point decodes the SFT reference's model, its dev NLL is that model's, and its predictions are its own."""
    point = dict(COPY, name="SFT+copy-tune")
    cfg = study(splits=[], methods=["sft"], tune_examples=2,
                ablation={"lams": [], "reasoner_layers": [], "points": [point], "train_examples": 2,
                          "eval_examples": 2, "max_new_tokens": 6})
    assert main(["study", "--config", cfg]) == 0
    log = capsys.readouterr().out
    ab = tmp_path / "out" / "ablations"
    assert "[SFT+copy-tune] decoding the trained model of SFT" in log and "[SFT+copy-tune] training" not in log
    assert not (ab / "SFT_copy-tune" / "train").exists() and (ab / "SFT" / "train" / "final").is_dir()
    sft, copy = _lines(ab / "SFT" / "predictions.jsonl"), _lines(ab / "SFT_copy-tune" / "predictions.jsonl")
    assert [r["id"] for r in copy] == [r["id"] for r in sft] and len(sft) == 2
    assert {r["run"]["checkpoint"] for r in copy} == {r["run"]["checkpoint"] for r in sft}
    assert [r["prediction"] for r in copy] != [r["prediction"] for r in sft]
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["ablations"]["rows"]}
    assert set(rows) == {"SFT", "SFT+copy-tune"} and "same_as" not in rows["SFT+copy-tune"]
    assert rows["SFT+copy-tune"]["dev_nll"] == rows["SFT"]["dev_nll"] is not None
    assert rows["SFT+copy-tune"]["init_dev_nll"] == rows["SFT"]["init_dev_nll"] is not None
    assert rows["SFT+copy-tune"]["train_s_per_step"] == rows["SFT"]["train_s_per_step"] > 0


@pytest.mark.parametrize("point, message", [
    ({"name": "X", "model_from": "Y"}, "ablation.points: X: model_from 'Y' is not a row listed before it"),
    ({"name": "X", "model_from": "SFT", "overrides": {"data.k": 2}}, "ablation.points: X decodes the model of SFT"),
])
def test_ablation_point_model_from_misuse_is_a_one_line_error_before_anything_runs(tmp_path, study, capsys, point,
                                                                                    message):
    cfg = study(splits=[], ablation={"lams": [], "reasoner_layers": [], "points": [point]})
    assert main(["study", "--config", cfg]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
