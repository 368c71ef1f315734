"""The study's analysis axes (issue #16): history length k (Table 4: a FlyThinker and an SFT point per k, the
profile budget growing with k), Reasoner depth up to a full copy of the Generator (Fig. 5), and the figures and
table `ablation_plots` draws from the ablation rows (Figs. 5, 6, Table 4)."""

import json
import math

import pytest
import torch

from flythinker.cli.main import main
from flythinker.config import ConfigError, from_dict


def _study(ablation: dict, data: dict | None = None, **top):
    from flythinker.experiments.study import StudyConfig

    return from_dict(StudyConfig, {"data": data or {}, "ablation": {"lams": [], "reasoner_layers": [], **ablation},
                                   **top})


def _tiny_generator(tmp_path, tokenizer, layers: int = 2):
    from flythinker.testing import tiny_lm

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, num_layers=layers, max_positions=2048).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    return gen_dir


# ---------------------------------------------------------------------------------------------------------------
# history length


def test_points_with_one_resolved_setting_share_a_key_and_others_do_not():
    from flythinker.experiments.study import _setting_key

    cfg = _study({"history_k": [2, 3], "lams": [0.5, 0.2], "reasoner_layers": [8]},
                 data={"k": 2, "profile_tokens": 256}, model={"reasoner": "8", "fusion": {"lam": 0.5}})
    keys = {p.name: _setting_key(p.spec(), cfg) for _, _, p in cfg.ablation.all_points(cfg.data)}
    assert keys["lam=0.5"] == keys["layers=8"] == keys["k=2"]  # the experiment's own setting, three names
    assert keys["SFT k=2"] == keys["SFT"] != keys["k=2"]  # same data, another method
    assert len({keys["lam=0.2"], keys["k=3"], keys["SFT k=3"], keys["lam=0.5"]}) == 4


def test_history_k_is_a_flythinker_and_an_sft_point_per_k_with_a_budget_growing_with_k():
    cfg = _study({"history_k": [1, 3], "lams": [0.2], "reasoner_layers": [4]}, data={"k": 2, "profile_tokens": 250})
    pts = cfg.ablation.all_points(cfg.data)
    # the existing axes keep their names and overrides; the history points come after them, then SFT
    assert [p.name for _, _, p in pts] == ["lam=0.2", "layers=4", "k=1", "SFT k=1", "k=3", "SFT k=3", "SFT"]
    assert pts[0][2].overrides == {"model.fusion.lam": 0.2} and pts[1][2].overrides == {"model.reasoner": "4"}
    by_name = {p.name: (axis, value, p) for axis, value, p in pts}
    for k in (1, 3):
        budget = round(k * cfg.data.profile_tokens / cfg.data.k)  # the study's 125 tokens per item, times k
        ft_axis, ft_value, ft = by_name[f"k={k}"]
        sft_axis, sft_value, sft = by_name[f"SFT k={k}"]
        assert (ft_axis, ft_value, ft.spec().method) == ("history_k", k, "flythinker")
        assert (sft_axis, sft_value, sft.spec().method) == ("history_k_sft", k, "sft")
        for point in (ft, sft):  # both see the same prompts: same k, same budget
            data = point.spec().data_config(cfg.data)
            assert data.k == k and data.profile_tokens == budget
    assert not by_name["SFT k=3"][2].spec().impl.uses_reasoner


def test_history_budget_rounds_to_an_int():
    from flythinker.experiments.study import history_profile_tokens

    cfg = _study({"history_k": [2]}, data={"k": 3, "profile_tokens": 256})
    over = cfg.ablation.all_points(cfg.data)[0][2].overrides
    assert over["data.profile_tokens"] == history_profile_tokens(2, cfg.data) == 171  # 2 x 256 / 3 = 170.67
    assert isinstance(over["data.profile_tokens"], int)


@pytest.mark.parametrize("ablation, data, match", [
    ({"history_k": [0]}, {}, "ablation.history_k"),
    ({"history_k": [2, 2]}, {}, "ablation.history_k.*twice"),
    ({"reasoner_layers": [0]}, {}, "ablation.reasoner_layers"),
    ({"history_k": [2]}, {"k": 0}, "data.k"),
])
def test_bad_axis_values_are_one_line_config_errors_naming_the_field(ablation, data, match):
    with pytest.raises(ConfigError, match=match) as e:
        _study(ablation, data=data)
    assert "\n" not in str(e.value)


def test_a_point_named_like_a_history_point_is_refused():
    from flythinker.utils import UserError

    with pytest.raises(UserError, match="k=2.*twice"):
        _study({"history_k": [2], "points": [{"name": "k=2", "overrides": {"data.k": 1}}]})


# ---------------------------------------------------------------------------------------------------------------
# Reasoner size


def test_reasoner_layers_equal_to_the_generator_depth_is_a_full_copy(tmp_path, tokenizer):
    from flythinker.methods import ModelArgs

    gen_dir = _tiny_generator(tmp_path, tokenizer, layers=2)
    cfg = _study({"reasoner_layers": [2]}, model={"generator": str(gen_dir)})
    (axis, value, point), _sft = cfg.ablation.all_points(cfg.data)
    assert (axis, value, point.name) == ("reasoner_layers", 2, "layers=2")
    spec = point.spec()
    model, _ = spec.impl.build(spec.model_args(ModelArgs(generator=str(gen_dir))))
    g_sd, r_sd = model.generator.state_dict(), model.reasoner.state_dict()
    assert model.reasoner.config.num_hidden_layers == model.generator.config.num_hidden_layers == 2
    assert set(r_sd) == set(g_sd) and all(torch.equal(v, g_sd[k]) for k, v in r_sd.items())
    # its own weights (a copy, not the Generator's tensors): training one leaves the other alone
    assert all(v.data_ptr() != g_sd[k].data_ptr() for k, v in r_sd.items() if v.numel())


def test_reasoner_deeper_than_the_generator_is_a_one_line_error_before_any_model_loads(tmp_path, tokenizer, capsys):
    from flythinker.default_model import DEFAULT_NUM_LAYERS
    from flythinker.experiments.study import check_reasoner_depths, generator_depth

    gen_dir = _tiny_generator(tmp_path, tokenizer, layers=2)
    assert generator_depth(str(gen_dir)) == 2 and generator_depth("default") == DEFAULT_NUM_LAYERS == 30
    assert generator_depth("some-org/some-model") is None  # a hub id: only loading it tells (load_models checks)
    check_reasoner_depths(_study({"reasoner_layers": [1, 2]}, model={"generator": str(gen_dir)}))  # 2 = full: fine
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"data_root: {tmp_path}\nout: {tmp_path / 'out'}\nsplits: []\nmodel: {{generator: {gen_dir}}}\n"
                   "ablation: {lams: [], reasoner_layers: [1, 3]}\n")
    capsys.readouterr()  # the tiny model's save progress
    assert main(["study", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ablation.reasoner_layers" in err[0] and "3" in err[0]
    assert not (tmp_path / "out" / "ablations").exists()


# ---------------------------------------------------------------------------------------------------------------
# figures and table


def _row(axis, value, name, scores, nll):
    return {"axis": axis, "value": value, "name": name, "dev_nll": nll, "init_dev_nll": nll + 1.0,
            "metrics": scores, "overrides": {"data.profile_tokens": 128 * value} if "history" in axis else {}}


def _scores(seed: float) -> dict:
    return {"rouge1": 0.2 + seed / 100, "rougeL": 0.1 + seed / 200, "meteor": 0.15 + (seed % 3) / 50,
            "bleu": 1.0 + seed / 3}


def _ablations(lams=(0.0, 0.5, 2.0), depths=(4, 8, 30), ks=(2, 3)) -> dict:
    rows = [_row("lam", v, f"lam={v:g}", _scores(i), 2.0 - i / 10) for i, v in enumerate(lams)]
    rows += [_row("reasoner_layers", v, f"layers={v}", _scores(i + 3), 1.9 - i / 10) for i, v in enumerate(depths)]
    for i, k in enumerate(ks):
        rows += [_row("history_k", k, f"k={k}", _scores(2 * i + 1), 1.8), _row("history_k_sft", k, f"SFT k={k}",
                                                                                 _scores(i), 1.85)]
    rows.append(_row("sft", None, "SFT", _scores(0.5), 2.1))
    return {"split": "user", "train_examples": 8, "eval_examples": 4, "rows": rows, "comparisons": {}}


def test_minmax_normalize_scales_each_metric_to_0_1():
    from flythinker.experiments.ablation_plots import minmax_normalize

    assert minmax_normalize([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert minmax_normalize([7.0, 7.0]) == [0.5, 0.5]  # no spread: no ranking to show
    out = minmax_normalize([1.0, None, 3.0])
    assert out[0] == 0.0 and math.isnan(out[1]) and out[2] == 1.0


def test_figures_and_table_are_written_from_the_ablation_rows(tmp_path):
    from flythinker.experiments.ablation_plots import FILES, write_ablation_figures

    ab = _ablations()
    files = write_ablation_figures(ab, tmp_path, metrics=("rouge1", "rougeL", "bleu", "meteor"))
    assert set(files) == set(FILES)
    for key in ("fig5_reasoner_size", "fig6_lambda"):
        data = (tmp_path / FILES[key]).read_bytes()
        assert files[key] == str(tmp_path / FILES[key]) and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    table = (tmp_path / FILES["table4_history"]).read_text()
    rows = {(r["axis"], r["value"]): r for r in ab["rows"]}
    for k in (2, 3):
        ft, sft = rows[("history_k", k)], rows[("history_k_sft", k)]
        assert f"k={k} SFT | k={k} FlyThinker | k={k} Δ" in table and f"k={k}: {128 * k}" in table
        for m in ("rouge1", "bleu"):
            assert f"{ft['metrics'][m] - sft['metrics'][m]:+.4f}" in table
        assert f"{ft['dev_nll'] - sft['dev_nll']:+.4f}" in table
    assert "BERTScore" not in table  # a metric the study did not score has no row


def test_an_axis_with_fewer_than_two_points_gets_no_file(tmp_path):
    from flythinker.experiments.ablation_plots import write_ablation_figures

    files = write_ablation_figures(_ablations(lams=(0.5,), depths=(8,), ks=(2,)), tmp_path)
    assert files == {} and list(tmp_path.iterdir()) == []
    files = write_ablation_figures(_ablations(lams=(), depths=(4, 8), ks=()), tmp_path)
    assert list(files) == ["fig5_reasoner_size"] and [p.name for p in tmp_path.iterdir()] == ["fig5_reasoner_size.png"]


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
@pytest.mark.integration
def test_an_ablations_only_study_runs_the_history_and_depth_axes_and_draws_them(tmp_path, tokenizer):
    from flythinker import FlyThinker
    from flythinker.experiments.synthetic import write_demo_dataset

    gen_dir = _tiny_generator(tmp_path, tokenizer, layers=2)
    write_demo_dataset(tmp_path / "data", seed=1, n_users_train=3, n_users_test=2, items_per_user=6)
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"""
data_root: {tmp_path / 'data'}
out: {tmp_path / 'out'}
splits: []
bertscore: false
model: {{generator: {gen_dir}, reasoner: "1"}}
data: {{k: 1, profile_tokens: 40, query_tokens: 32, target_tokens: 16}}
train: {{batch_size: 2, grad_accum: 1, progress: false, lr_generator: 1.0e-3, lr_reasoner: 1.0e-3}}
decode: {{max_new_tokens: 4, batch_size: 2}}
ablation: {{lams: [0.0, 1.0], reasoner_layers: [1, 2], history_k: [1, 2], train_examples: 2, eval_examples: 2,
           max_new_tokens: 4}}
""")
    assert main(["study", "--config", str(cfg)]) == 0
    out = tmp_path / "out"
    ab = json.loads((out / "summary.json").read_text())["ablations"]
    assert [r["name"] for r in ab["rows"]] == ["SFT", "lam=0", "lam=1", "layers=1", "layers=2", "k=1", "SFT k=1",
                                               "k=2", "SFT k=2"]
    assert all(r["dev_nll"] > 0 for r in ab["rows"])
    # k=1 and layers=1 are the experiment's own setting (as SFT k=1 is SFT's): run once, reused with its scores
    rows = {r["name"]: r for r in ab["rows"]}
    assert rows["k=1"]["same_as"] == "layers=1" and rows["SFT k=1"]["same_as"] == "SFT"
    assert rows["k=1"]["metrics"] == rows["layers=1"]["metrics"] and rows["k=1"]["metrics"]
    assert not (out / "ablations" / "k_1").exists() and "same_as" not in rows["k=2"]
    # each history point trained on its own prompts: k items and k x 40 profile tokens, FlyThinker and SFT alike
    for name, k in (("k_2", 2), ("SFT_k_2", 2), ("layers_1", 1)):
        run = json.loads((out / "ablations" / name / "train" / "run.json").read_text())
        assert run["config"]["data"]["k"] == k and run["config"]["data"]["profile_tokens"] == 40 * k
    full = FlyThinker.from_pretrained(out / "ablations" / "layers_2" / "train" / "final")
    assert full.reasoner.config.num_hidden_layers == full.generator.config.num_hidden_layers == 2
    assert set(ab["files"]) == {"fig5_reasoner_size", "fig6_lambda", "table4_history"}
    for path in ab["files"].values():
        assert path.startswith(str(out / "ablations")) and (tmp_path / path).stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert "## Ablations" in md and all(p in md for p in ab["files"].values())
