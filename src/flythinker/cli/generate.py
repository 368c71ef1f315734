"""`flythinker generate`: predictions of a saved model for a dataset, as a resumable JSONL file.

--out is resumed only when it is a predictions file of this tool written by the same run (checkpoint, data and
prompt settings, decode settings: see flythinker.predictions); anything else is refused before the model loads and
before the file is changed."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..utils import UserError

# The verb's defaults (the library's DecodeConfig keeps its own): long outputs and a fixed seed for chunk seeding.
MAX_NEW_TOKENS = 512
SEED = 0


def add_cli(parser: argparse.ArgumentParser) -> None:
    from ..config import add_dataclass_args
    from ..data import DataConfig
    from ..decoding.sampling import DecodeConfig

    parser.add_argument("--checkpoint", required=True, help="FlyThinker checkpoint directory (save_pretrained / "
                        "trainer output); its tokenizer is read from DIR/generator")
    parser.add_argument("--data", required=True, help="dataset file/directory/LongLaMP config (as `flythinker data`)")
    parser.add_argument("--split", default=None, help="split for directories / hub configs")
    parser.add_argument("--out", required=True, help="predictions JSONL (resumed if it exists and was written by "
                        "this same checkpoint, data and settings; anything else there is refused, never overwritten)")
    parser.add_argument("--method-name", default=None,
                        help="name stored in each line (default: the checkpoint's training method)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N examples (0 = all)")
    parser.add_argument("--config", default=None,
                        help="YAML whose `data:` section sets the prompt settings (default: the checkpoint's "
                             "train_config.json, so prompts match training); --data.* flags override both")
    d = DecodeConfig()
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help=f"generated tokens per example at most (default {MAX_NEW_TOKENS})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (the paper's "
                        "decoding is --do-sample --temperature 0.8 --top-p 0.95)")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--seed", type=int, default=SEED, help="chunk k of the data is decoded with seed + k")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bf16 on a CUDA GPU that supports it, else fp32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_args(parser, DataConfig, prefix="data.")
    parser.set_defaults(func=_cli_main)


def decode_config(args: argparse.Namespace):
    """DecodeConfig from the flags; a bad value is one line naming the flag, before any model loads."""
    from ..decoding.sampling import DecodeConfig

    checks = [("--max-new-tokens", args.max_new_tokens >= 1, ">= 1"), ("--batch-size", args.batch_size >= 1, ">= 1"),
              ("--temperature", args.temperature >= 0, ">= 0"), ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
              ("--top-k", args.top_k >= 0, ">= 0")]
    for flag, ok, rule in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise UserError(f"{flag} must be {rule}; got {value}")
    try:
        return DecodeConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def _data_config(args: argparse.Namespace, ckpt: Path):
    """defaults < the checkpoint's train_config.json `data` < --config YAML `data:` < --data.* flags."""
    from ..config import from_dict, load_yaml
    from ..data import DataConfig
    from ..inference import checkpoint_train_config

    saved = checkpoint_train_config(ckpt).get("data")
    data: dict[str, Any] = dict(saved) if isinstance(saved, dict) else {}
    if args.config:
        loaded = load_yaml(args.config)
        data.update(loaded["data"] if isinstance(loaded.get("data"), dict) else loaded)
    for name, value in vars(args).items():
        if name.startswith("data."):
            data[name[len("data."):]] = value
    return from_dict(DataConfig, data, where=args.config or "data settings")


def _data_path(data: str) -> Path | None:
    """The local file or directory a --data value names ("DIR:SPLIT" included), or None (a hub config)."""
    p = Path(data).expanduser()
    if p.exists():
        return p
    base, sep, _ = data.rpartition(":")
    if sep and Path(base).expanduser().exists():
        return Path(base).expanduser()
    return None


def check_out_is_not_data(out: Path, data: str) -> None:
    """--out must not be the --data file (appending predictions would destroy the dataset) nor lie inside a --data
    directory (it would be read as data next time)."""
    src = _data_path(data)
    if src is None:
        return
    if out.exists() and src.is_file() and os.path.samefile(out, src):
        raise UserError(f"--out {out} is the --data file; writing predictions there would destroy the dataset: "
                        f"pass another --out")
    if src.is_dir():
        root, target = src.resolve(), out.resolve()
        if root == target or root in target.parents:
            raise UserError(f"--out {out} is inside the --data directory {src} (it would be read as data next "
                            f"time); pass a path outside it")


def _cli_main(args: argparse.Namespace) -> int:
    """Everything that can be refused is refused before the model loads and before --out is created or changed:
    flags, the --out target (a regular file or absent; not the dataset), the checkpoint's files, the data, and an
    existing --out (ours, same method and run fingerprints, not locked by another process)."""
    from ..data import load_examples
    from ..inference import Predictor, default_method_name, load_checkpoint, run_fingerprint, validate_checkpoint
    from ..predictions import check_output_target, check_resume, generate_predictions
    from ..utils import print0, set_threads

    set_threads()
    ckpt = Path(args.checkpoint)
    decode = decode_config(args)
    if args.limit < 0:
        raise UserError(f"--limit must be >= 0 (0 = all examples); got {args.limit}")
    out = check_output_target(args.out, "--out")
    check_out_is_not_data(out, args.data)
    validate_checkpoint(ckpt)
    data_cfg = _data_config(args, ckpt)
    examples = load_examples(args.data, task=data_cfg.task, split=args.split)
    if not examples:
        raise UserError(f"{args.data}: no examples")
    # The data fingerprint covers the whole dataset, so a resume may raise or drop --limit.
    run = run_fingerprint(ckpt, examples, data_cfg, decode, args.dtype)
    if args.limit > 0:
        examples = examples[: args.limit]
    method = args.method_name or default_method_name(ckpt)
    check_resume(out, method=method, run=run)
    model, tokenizer = load_checkpoint(ckpt, args.dtype)
    fn = Predictor(model, tokenizer, data_cfg, decode).batch_fn([e.id for e in examples])
    stats = generate_predictions(examples, fn, out, batch_size=decode.batch_size, method=method,
                                 progress=not args.no_progress, run=run)
    note = " (dropped a torn last line first)" if stats.repaired else ""
    print0(f"{stats.out_path}: {stats.written} new, {stats.skipped} already there, {stats.total} total{note}")
    return 0
