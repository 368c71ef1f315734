"""`flythinker analyze trajectories`: the Reasoner's latent trajectories of a few users (the paper's App. H,
Figure 7), projected with t-SNE, with each user's direction, and the rank correlation between users' direction
cosines and the similarity of their texts (flythinker.analysis.trajectories). Prints a table and ends with one JSON
line; takes `--config YAML` and flags like every verb."""

from __future__ import annotations

import argparse
import os

from ..config import add_dataclass_args, build_config


def add_cli(parser: argparse.ArgumentParser) -> None:
    from ..analysis.trajectories import TrajectoryConfig

    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    t = sub.add_parser(
        "trajectories", help="t-SNE of the Reasoner's states over users' responses, per-user directions, and "
                             "whether closer directions mean more alike texts",
        description="Runs a FlyThinker checkpoint's Reasoner teacher-forced over the references of --users users "
                    "(seeded), projects its states with t-SNE, fits each user's direction from early to late "
                    "positions, draws trajectories.png (the paper's Figure 7) and tests whether users with closer "
                    "directions (cosine, full state space) have more similar references (TF-IDF; Spearman, "
                    "permutation p-value).")
    t.add_argument("--config", help="YAML with the settings below (flags override it)")
    add_dataclass_args(t, TrajectoryConfig)
    t.set_defaults(func=_trajectories, config_cls=TrajectoryConfig)


def _trajectories(args: argparse.Namespace) -> int:
    from ..analysis.trajectories import run_trajectories
    from ..utils import set_threads
    from .main import print_json_line

    # Only local folders are read; make sure no library reaches for the hub (set before transformers loads).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg = build_config(args.config_cls, args, args.config)
    set_threads()
    print_json_line(run_trajectories(cfg))
    return 0


__all__ = ["add_cli"]
