"""`flythinker study` end to end on tiny models and a tiny generated dataset: every method, both splits, CIs,
efficiency ratios, the position-sensitive table and the ablations land in the results folder."""

import json

import pytest

from flythinker.cli.main import main


def test_study_rejects_a_variant_named_like_a_method(tmp_path, capsys):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"data_root: {tmp_path}\nvariants: [{{name: SFT, overrides: {{model.fusion.lam: 0.2}}}}]\n")
    assert main(["study", "--config", str(cfg)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SFT" in err[0] and "twice" in err[0]


def test_median_step_seconds_skips_step_one_and_ignores_bursts(tmp_path):
    from flythinker.experiments.timing import median_step_seconds

    log = tmp_path / "log.jsonl"
    rows = [{"step": 1, "seconds": 50.0}, {"step": 2, "seconds": 2.0}, {"step": 3, "seconds": 40.0},
            {"step": 4, "seconds": 2.2}, {"step": 5, "seconds": 2.1}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert abs(median_step_seconds(log) - 2.15) < 1e-9
    assert median_step_seconds(tmp_path / "missing.jsonl") is None
    log.write_text(json.dumps({"step": 1, "seconds": 3.0}) + "\n")
    assert median_step_seconds(log) is None


def test_summary_links_the_segments_plot_the_report_writes():
    """Regression: render_summary looked for `segments_png` while the report writes `segments_plot`, so no study
    summary linked its plot."""
    from flythinker.experiments.study import render_summary

    split = {"train_examples": 2, "eval_examples": 1, "metrics": {"SFT": {"metrics": {"rouge1": 0.5}}},
             "comparisons": {}, "efficiency": [], "files": {"segments_plot": "out/user/eval/segments.png"}}
    md = render_summary({"splits": {"user": split}}, ["rouge1"])
    assert "Position-sensitive plot: out/user/eval/segments.png" in md


def test_variants_and_ablation_points_are_override_lists():
    from flythinker.config import ConfigError, from_dict
    from flythinker.experiments.study import StudyConfig

    cfg = from_dict(StudyConfig, {"methods": ["sft"], "variants": [
        {"name": "FT-lr", "overrides": {"train.lr_reasoner": 1e-5, "model.fusion.lam": 0.2}}],
        "ablation": {"lams": [0.2], "reasoner_layers": [], "points": [
            {"name": "rag-k1", "method": "rag", "overrides": {"data.k": 1}}]}})
    rows = cfg.rows()
    assert [r.name for r in rows] == ["SFT", "FT-lr"]
    assert rows[1].model_args(cfg.model).fusion.lam == 0.2 and rows[1].train_args(cfg.train).lr_reasoner == 1e-5
    names = [p.name for _, _, p in cfg.ablation.all_points()]
    assert names == ["lam=0.2", "rag-k1", "SFT"]
    rag = cfg.ablation.all_points()[1][2].spec()
    assert rag.data_config(cfg.data).k == 1 and not rag.trained
    with pytest.raises(ConfigError, match="fusion.lamda"):
        from_dict(StudyConfig, {"variants": [{"name": "x", "overrides": {"model.fusion.lamda": 1}}]})
    with pytest.raises(ConfigError, match="must start with"):
        from_dict(StudyConfig, {"variants": [{"name": "x", "overrides": {"lam": 1}}]})
