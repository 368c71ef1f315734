"""`flythinker train`: train one method (`--model.method flythinker|sft`) from a YAML config and dotted flags."""

from __future__ import annotations

import argparse

from ..config import add_dataclass_args, build_config, to_dict
from ..training.config import TrainConfig
from ..utils import UserError


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with model/data/train sections (flags override it)")
    add_dataclass_args(parser, TrainConfig)
    parser.set_defaults(func=_cli_main)


def _cli_main(args: argparse.Namespace) -> int:
    run_training(build_config(TrainConfig, args, args.config))
    return 0


def run_training(cfg: TrainConfig):
    """What `flythinker train` does: load data and the method's models, encode, fit, save final/."""
    from ..data import encode_example, load_examples
    from ..methods import get_method
    from ..training.loop import fit
    from ..utils import print0, seed_everything, set_threads

    set_threads(cfg.train.threads or None)
    if not cfg.train_data:
        raise UserError("train_data is required (a .jsonl/.jsonl.gz file or a LongLaMP file/directory)")
    examples = load_examples(cfg.train_data, task=cfg.data.task)
    if cfg.limit > 0:
        examples = examples[: cfg.limit]
    method = get_method(cfg.model.method)
    seed_everything(cfg.train.seed)
    model, tokenizer = method.build(cfg.model)
    data_cfg = method.data_config(cfg.data)
    features = [encode_example(ex, tokenizer, data_cfg, with_response=True) for ex in examples]
    print0(f"training {method.name} on {len(features)} examples from {cfg.train_data}")
    result = fit(model, features, cfg.train, tokenizer.pad_token_id, config=to_dict(cfg))
    if result.final_dir is not None:
        print0(f"saved {result.final_dir}")
    return result
