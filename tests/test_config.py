"""Every shipped config parses into its verb's dataclass and starts with the command that runs it."""

from pathlib import Path

import pytest

import flythinker
from flythinker.config import ConfigError, from_dict, load_yaml

CONFIG_DIR = Path(flythinker.__file__).parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def _config_class(first_line: str):
    from flythinker.experiments.demo import DemoConfig
    from flythinker.experiments.study import StudyConfig
    from flythinker.training.config import TrainConfig

    verb = first_line.split()[2]
    return {"study": StudyConfig, "train": TrainConfig, "demo": DemoConfig}[verb]


def test_configs_are_shipped():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# flythinker ") and f"configs/{path.name}" in first
    cfg = from_dict(_config_class(first), load_yaml(path), where=str(path))
    assert cfg is not None


def test_unknown_key_is_a_clear_error(tmp_path):
    from flythinker.experiments.study import StudyConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr_generatr: 1.0\n")
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) lr_generatr"):
        from_dict(StudyConfig, load_yaml(bad), where=str(bad))
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="line"):
        load_yaml(bad)


def test_a_list_flag_takes_a_yaml_flow_list():
    """`--ablation.points '[{...}]'` adds points from the command line; comma lists still work; bad YAML is one
    ConfigError naming the field."""
    import argparse

    from flythinker.cli.study import add_cli
    from flythinker.config import build_config
    from flythinker.experiments.study import StudyConfig

    parser = argparse.ArgumentParser()
    add_cli(parser)
    args = parser.parse_args([
        "--splits", "user,temporal", "--methods", "sft", "--ablation.points",
        "[{name: SFT-noeos, method: sft, overrides: {data.eos_after_cut: false, decode.max_new_tokens: 48}},"
        " {name: SFT-noeos+copy2, model_from: SFT-noeos, overrides: {decode.copy_bonus: 2.0}}]"])
    cfg = build_config(StudyConfig, args)
    assert cfg.splits == ["user", "temporal"]
    specs = {s.name: s for _, _, s in cfg.ablation.specs(cfg.data)}
    assert [n for n in specs if "noeos" in n] == ["SFT-noeos", "SFT-noeos+copy2"]
    assert specs["SFT-noeos"].data_config(cfg.data).eos_after_cut is False
    assert specs["SFT-noeos+copy2"].decode_config(cfg.decode).copy_bonus == 2.0
    bad = parser.parse_args(["--ablation.points", "[{name: x"])
    with pytest.raises(ConfigError, match=r"ablation\.points: invalid YAML list"):
        build_config(StudyConfig, bad)
