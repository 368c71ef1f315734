"""`flythinker study`: the full comparison study (flythinker.experiments.study) from a YAML config and flags."""

from __future__ import annotations

import argparse

from ..config import add_dataclass_args, build_config


def add_cli(parser: argparse.ArgumentParser) -> None:
    from ..experiments.study import StudyConfig

    parser.add_argument("--config", help="study YAML (e.g. configs/commits_study.yaml); flags override it")
    add_dataclass_args(parser, StudyConfig)
    parser.set_defaults(func=_cli_main)


def _cli_main(args: argparse.Namespace) -> int:
    from ..experiments.study import StudyConfig, run_study

    run_study(build_config(StudyConfig, args, args.config))
    return 0
