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


def test_tune_pool_and_reported_examples_are_disjoint_slices_of_one_shuffle():
    """tune_examples holds out the first N of the seeded dev shuffle for choosing settings (the ablations score
    there); the reported comparison takes the next eval_examples. 0 keeps the earlier plan exactly."""
    from flythinker.config import from_dict
    from flythinker.experiments.study import StudyConfig, _sample, dev_pools
    from flythinker.utils import UserError

    dev = list(range(50))
    tune, rep = dev_pools(dev, from_dict(StudyConfig, {"tune_examples": 10, "eval_examples": 30, "seed": 3}))
    assert len(tune) == 10 and len(rep) == 30 and not set(tune) & set(rep)
    assert tune + rep == _sample(dev, 40, 3)
    tune0, rep0 = dev_pools(dev, from_dict(StudyConfig, {"tune_examples": 0, "eval_examples": 30, "seed": 3}))
    assert tune0 == [] and rep0 == _sample(dev, 30, 3)  # what studies before tune_examples reported
    _, everything = dev_pools(dev, from_dict(StudyConfig, {"tune_examples": 45, "eval_examples": 0}))
    assert len(everything) == 5
    with pytest.raises(UserError, match="tune_examples"):
        from_dict(StudyConfig, {"tune_examples": -1})


def test_a_setting_added_later_at_its_default_does_not_invalidate_a_finished_run():
    """Regression: a study folder trained before a new setting existed (e.g. model.fusion.gate) was refused by a
    newer flythinker (`(unset) -> "none"`), although the default is the old behaviour. A non-default value, or a
    changed existing one, is still a difference."""
    from flythinker.training.checkpoint import identity_difference

    saved = {"config": {"model": {"fusion": {"lam": 0.5}}}, "data": "d", "world_size": 1, "fingerprint": "old"}
    now = {"config": {"model": {"fusion": {"lam": 0.5, "gate": "none"}}}, "data": "d", "world_size": 1,
           "examples": 1, "fingerprint": "new"}
    defaults = {"model": {"fusion": {"lam": 0.5, "gate": "none"}}}
    assert identity_difference(saved, now, defaults=defaults) == []
    assert identity_difference(saved, now) == ['model.fusion.gate (unset) -> "none"']
    now["config"]["model"]["fusion"]["gate"] = "scalar"
    assert identity_difference(saved, now, defaults=defaults) == ['model.fusion.gate (unset) -> "scalar"']
    now["config"]["model"]["fusion"].update(gate="none", lam=0.2)
    assert identity_difference(saved, now, defaults=defaults) == ["model.fusion.lam 0.5 -> 0.2"]


def test_summary_gives_bleu_length_terms_when_the_report_has_them():
    from flythinker.experiments.study import render_summary

    rows = {"SFT": {"metrics": {"bleu": 2.5}, "bleu_length": {"ratio": 0.693, "bp": 0.642}},
            "Copy-latest": {"metrics": {"bleu": 4.8}, "bleu_length": {"ratio": 1.007, "bp": 1.0}}}
    split = {"train_examples": 2, "eval_examples": 1, "metrics": rows, "comparisons": {}, "efficiency": [],
             "files": {}}
    md = render_summary({"splits": {"user": split}}, ["bleu"])
    assert "| method | bleu | BLEU len ratio | BLEU BP |" in md
    assert "| SFT | 2.5000 | 0.693 | 0.642 |" in md and "| Copy-latest | 4.8000 | 1.007 | 1.000 |" in md
    split["metrics"] = {"SFT": {"metrics": {"bleu": 2.5}}}  # no BLEU length terms: no columns
    assert "BLEU BP" not in render_summary({"splits": {"user": split}}, ["bleu"])
