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
