"""The `flythinker data` verb. `data inspect PATH` loads a dataset and prints counts (examples, users), profile
sizes, token-length percentiles under the chosen tokenizer, how often the budgets cut, and one rendered prompt.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import add_dataclass_args, from_dict, load_yaml
from ..data.config import DataConfig
from ..utils import UserError


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    p = sub.add_parser("inspect", help="counts, profile sizes, token-length percentiles and a rendered prompt",
                       description="Inspect a personalized dataset (generic JSONL or LongLaMP).")
    p.add_argument("path", help="file, directory (DIR:SPLIT picks a split), or LongLaMP config such as "
                                "product_review_user:val")
    p.add_argument("--split", default=None, help="split for directories / hub configs (train, val/dev, test)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or hub id, or 'tiny'; default: the library's default model tokenizer")
    p.add_argument("--config", default=None, help="YAML file; its `data:` section (or the whole file) sets the flags")
    p.add_argument("--limit", type=int, default=200, help="examples encoded for the token statistics (default 200)")
    p.add_argument("--example", type=int, default=0, help="index of the example whose prompt is shown (default 0)")
    add_dataclass_args(p, DataConfig)
    # The same settings under the spelling `train`/`generate` use (--data.k), so a command line can be copied over.
    for name in DataConfig.__dataclass_fields__:
        p.add_argument(f"--data.{name}", dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=inspect_command)


def load_tokenizer(spec: str | None) -> tuple[Any, str]:
    """(tokenizer, description). spec: a directory / hub id, "tiny", or None for the library default, falling
    back to the tiny test tokenizer (and saying so) when no default is available."""
    from ..models import load_tokenizer as load
    from ..testing import tiny_tokenizer

    if spec == "tiny":
        return tiny_tokenizer(), "tiny test tokenizer"
    if spec:
        try:
            return load(spec), spec
        except UserError as e:
            raise UserError(f"--tokenizer {spec}: {str(e).split(': ', 1)[-1]}") from None
    try:
        return load(None), "default model tokenizer"
    except Exception as e:  # a broken default must not stop an inspection; say why and fall back
        why = f"default tokenizer failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return tiny_tokenizer(), f"tiny test tokenizer ({why}; pass --tokenizer DIR for real token counts)"


def _percentiles(values: list[int]) -> str:
    import numpy as np

    if not values:
        return "     -      -      -      -"
    a = np.asarray(values, dtype=float)
    return "".join(f"{v:>7.0f}" for v in (*np.percentile(a, [50, 90, 99]), a.max()))


def _data_config(args: argparse.Namespace) -> DataConfig:
    """defaults < YAML (its `data:` section, so a train config works, or the whole file) < flags."""
    data: dict[str, Any] = {}
    if args.config:
        loaded = load_yaml(args.config)
        data = dict(loaded["data"]) if isinstance(loaded.get("data"), dict) else loaded
    flags = {f: v for f, v in vars(args).items() if f in DataConfig.__dataclass_fields__}
    return from_dict(DataConfig, {**data, **flags}, where=args.config or "flags")


def inspect_command(args: argparse.Namespace) -> int:
    from ..data.collate import encode_example
    from ..data.prompts import build_prompt, resolve_task
    from ..data.schema import item_text, load_examples

    cfg = _data_config(args)
    examples = load_examples(args.path, task=cfg.task, split=args.split)
    tokenizer, tok_desc = load_tokenizer(args.tokenizer)
    n = len(examples)
    print(f"source: {args.path}" + (f" (split {args.split})" if args.split else ""))
    if not examples:
        print("examples: 0")
        return 0
    task = resolve_task(cfg, examples[0])
    print(f"task: {task}" + (" (detected)" if cfg.task == "auto" else ""))
    print(f"examples: {n}   users: {len({e.user_id for e in examples})}")
    sizes = [len(e.profile) for e in examples]
    print(f"profile items per example: min {min(sizes)}  mean {sum(sizes) / n:.1f}  max {max(sizes)}"
          f"  (empty: {sum(s == 0 for s in sizes)})")
    print(f"tokenizer: {tok_desc}")
    print(f"selection: retrieval={cfg.retrieval} k={cfg.k}; budgets (tokens): profile {cfg.profile_tokens}, "
          f"query {cfg.query_tokens}, target {cfg.target_tokens}")

    sample = examples[: max(0, args.limit)] if args.limit > 0 else examples

    def lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    inputs, outputs = lengths([e.input for e in sample]), lengths([e.output for e in sample])
    items = lengths([item_text(it) for e in sample for it in e.profile])
    feats = [encode_example(e, tokenizer, cfg, with_response=True) for e in sample]
    print(f"token lengths over {len(sample)} example(s):     p50    p90    p99    max")
    print(f"  input (raw)                   {_percentiles(inputs)}")
    print(f"  output (raw)                  {_percentiles(outputs)}")
    print(f"  profile item text (raw, each) {_percentiles(items)}")
    print(f"  prompt (encoded)              {_percentiles([len(f['prompt_ids']) for f in feats])}")
    label = f"response (encoded, {'incl. EOS' if cfg.eos_after_cut else 'EOS if whole'})"
    print(f"  {label:<29} {_percentiles([len(f['response_ids']) for f in feats])}")
    cut_q = sum(x > cfg.query_tokens for x in inputs) / len(sample)
    cut_t = sum(x > cfg.target_tokens for x in outputs) / len(sample)
    print(f"cut by budgets: queries {100 * cut_q:.1f}%, targets {100 * cut_t:.1f}% "
          f"({'ending in EOS' if cfg.eos_after_cut else 'no EOS after the cut'}: data.eos_after_cut)")

    if not 0 <= args.example < n:
        raise UserError(f"--example {args.example} is out of range (0..{n - 1})")
    ex = examples[args.example]
    print(f"--- example {args.example}: id {ex.id}, user {ex.user_id}, {len(ex.profile)} profile item(s); "
          f"rendered prompt ---")
    print(build_prompt(ex, tokenizer, cfg))
    target = ex.output if len(ex.output) <= 400 else ex.output[:400] + " ..."
    print("--- target (first 400 characters) ---")
    print(target)
    return 0


__all__ = ["add_cli", "inspect_command", "load_tokenizer"]
