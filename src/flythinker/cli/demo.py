"""`flythinker demo [--quick]`: the end-to-end demo (flythinker.experiments.demo)."""

from __future__ import annotations

import argparse

from ..config import add_dataclass_args, build_config


def add_cli(parser: argparse.ArgumentParser) -> None:
    from ..experiments.demo import DemoConfig

    parser.add_argument("--quick", action="store_true", help="small preset: a smoke run of a few minutes")
    parser.add_argument("--config", help="YAML overriding the demo configuration (applied over the preset)")
    parser.add_argument("--data", dest="data_dir", default=argparse.SUPPRESS,
                        help="shortcut for --data_dir: a user-split dataset directory (default: synthetic data)")
    parser.add_argument("--generator", dest="model.generator", default=argparse.SUPPRESS,
                        help="shortcut for --model.generator")
    parser.add_argument("--reasoner", dest="model.reasoner", default=argparse.SUPPRESS,
                        help="shortcut for --model.reasoner")
    add_dataclass_args(parser, DemoConfig)
    parser.set_defaults(func=_cli_main)


def demo_config(args: argparse.Namespace):
    """preset (--quick or the full defaults) < --config YAML < flags, each overriding exactly what it names."""
    from ..experiments.demo import DemoConfig, quick_preset

    base = quick_preset(DemoConfig()) if args.quick else DemoConfig()
    return build_config(DemoConfig, args, args.config, base=base)


def _cli_main(args: argparse.Namespace) -> int:
    from ..experiments.demo import run_demo

    run_demo(demo_config(args))
    return 0
