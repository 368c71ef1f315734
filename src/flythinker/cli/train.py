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
    """What `flythinker train` does: load data and the method's models, encode, fit, save final/.

    The cheap checks come first, so a bad data file, an out_dir that is a file, an out_dir held by a running
    `train` or one holding another run fails in a moment, before any model is loaded."""
    import contextlib

    from ..data import load_examples
    from ..methods import get_method
    from ..safeio import check_output_dir
    from ..training.checkpoint import check_fresh_out_dir, run_lock
    from ..training.loop import fit
    from ..utils import is_main_process, print0, seed_everything, set_threads

    set_threads(cfg.train.threads or None)
    if not cfg.train_data:
        raise UserError("train_data is required (a .jsonl/.jsonl.gz file or a LongLaMP file/directory)")
    out_dir = check_output_dir(cfg.train.out_dir, "train.out_dir")
    examples = load_examples(cfg.train_data, task=cfg.data.task)
    if cfg.limit > 0:
        examples = examples[: cfg.limit]
    if not examples:
        raise UserError(f"train_data {cfg.train_data}: no training examples")
    method = get_method(cfg.model.method)
    # An existing out_dir is locked now (fit takes the same lock again); a new one is created by fit itself, so a
    # command that fails before training leaves nothing behind.
    lock = run_lock(out_dir) if out_dir.is_dir() and is_main_process() else contextlib.nullcontext()
    with lock:
        if is_main_process():
            check_fresh_out_dir(out_dir, cfg.train.resume, cfg.train.overwrite)
        seed_everything(cfg.train.seed)
        model, tokenizer = method.build(cfg.model)
        data_cfg = method.data_config(cfg.data)
        features = method.features(examples, tokenizer, data_cfg, args=cfg.model, data_path=cfg.train_data)
        print0(f"training {method.name} on {len(features)} examples from {cfg.train_data}")
        result = fit(model, features, cfg.train, tokenizer.pad_token_id, config=to_dict(cfg))
    if result.final_dir is not None:
        print0(f"saved {result.final_dir}")
    return result
