"""`flythinker generate`: predictions of a saved model for a dataset, as a resumable JSONL file.

--out is resumed only when it is a predictions file of this tool written by the same run (checkpoint, data and
prompt settings, decode settings: see flythinker.predictions); anything else is refused before the model loads and
before the file is changed. Under `accelerate launch --num_processes N -m flythinker generate ...` the examples are
shared out over the processes, one device each when there are several, and merged into --out (`_data_parallel`)."""

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
    from ..decoding.sampling import BACKENDS, DecodeConfig

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
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                        help="transformers' repetition penalty on every id already in the prompt or output (1 = off)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=d.no_repeat_ngram_size,
                        help="ban any n-gram of this size from occurring twice (0 = off)")
    parser.add_argument("--min-new-tokens", type=int, default=d.min_new_tokens,
                        help="no EOS before this many new tokens (0 = off)")
    parser.add_argument("--penalty-scope", default=d.penalty_scope, choices=("all", "response"),
                        help="what the repetition penalty and n-gram ban look at: prompt and output (all) or the "
                             "generated tokens only (response)")
    parser.add_argument("--copy-bonus", type=float, default=d.copy_bonus,
                        help="added to the logit of each token that continues an n-gram of the prompt (the user's "
                             "history) ending the response so far (0 = off)")
    parser.add_argument("--copy-ngram", type=int, default=d.copy_ngram, help="the n of --copy-bonus (>= 2)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype for decoding; auto: on a CPU with native bf16 (AVX512-BF16, AMX) "
                             "whichever of fp32 and bf16 decodes faster at --decode.batch_size, measured once and "
                             "cached; bf16 on a CUDA GPU with bf16; else fp32. float32 for exact fp32 decoding. "
                             "Predictions record the dtype used, so a resume never mixes two")
    parser.add_argument("--decode.backend", "--decode-backend", dest="backend", default="auto",
                        choices=("auto", *BACKENDS), help="how FlyThinker's two calls per step run (DecodeConfig."
                        "concurrent); auto: measured once per machine, model pair and batch size on one CPU, else the "
                        "placement's rule (docs/decode_backends.md). The backends run the same operations (greedy "
                        "text agrees token for token), so it is not part of the resume fingerprint")
    parser.add_argument("--reasoner-device", "--reasoner_device", dest="reasoner_device", default="",
                        help="device of the Reasoner, e.g. cuda:1 (the paper's two-GPU setting: R and G step "
                             "concurrently on their own GPUs) or cpu; default: the Generator's")
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
                            top_k=args.top_k, seed=args.seed, repetition_penalty=args.repetition_penalty,
                            no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens,
                            penalty_scope=args.penalty_scope, copy_bonus=args.copy_bonus,
                            copy_ngram=args.copy_ngram, backend=getattr(args, "backend", None))
    except ValueError as e:
        raise UserError(str(e)) from None


def _reasoner_device(args: argparse.Namespace) -> str:
    """--reasoner-device, checked to exist on this machine before any model loads ("" = the Generator's)."""
    from ..config import ConfigError
    from ..decoding.concurrency import check_device

    spec = getattr(args, "reasoner_device", "") or ""
    if spec:
        try:
            check_device(spec, "--reasoner-device")
        except ConfigError as e:
            raise UserError(str(e)) from None
    return spec


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

    world, rank = processes()
    set_threads(_threads_per_process(world))
    ckpt = Path(args.checkpoint)
    decode = decode_config(args)
    reasoner_device = _reasoner_device(args)
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
    dtype = _decode_dtype(ckpt, args.dtype, decode, out, world)
    run = run_fingerprint(ckpt, examples, data_cfg, decode, dtype)
    if args.limit > 0:
        examples = examples[: args.limit]
    method = args.method_name or default_method_name(ckpt)
    if world > 1:
        return _data_parallel(args, ckpt, data_cfg, decode, examples, out, method, run, world, rank, dtype)
    check_resume(out, method=method, run=run)
    model, tokenizer = load_checkpoint(ckpt, dtype, reasoner_device=reasoner_device)
    fn = Predictor(model, tokenizer, data_cfg, decode).batch_fn([e.id for e in examples])
    stats = generate_predictions(examples, fn, out, batch_size=decode.batch_size, method=method,
                                 progress=not args.no_progress, run=run)
    note = " (dropped a torn last line first)" if stats.repaired else ""
    print0(f"{stats.out_path}: {stats.written} new, {stats.skipped} already there, {stats.total} total{note}")
    return 0


def _decode_dtype(ckpt: Path, dtype: str, decode, out: Path, world: int) -> str:
    """The weights dtype to decode in, by name: an explicit --dtype as given; "auto" in a begun --out file the dtype
    it was begun in (so a resume is never refused because a fresh measurement now prefers the other), else the one
    that decodes faster at --decode.batch_size on this machine (`inference.checkpoint_decode_dtype`: measured and
    cached on a CPU with native bf16, the fixed rule elsewhere and in a data-parallel run, whose processes would time
    each other's load)."""
    from ..inference import checkpoint_decode_dtype, recorded_decode_dtype
    from ..utils import dtype_name, print0

    if dtype != "auto":
        return dtype
    begun = recorded_decode_dtype(out, decode)
    if begun is not None:
        return dtype_name(begun)
    choice = checkpoint_decode_dtype(ckpt, dtype, decode.batch_size)
    if world == 1:
        print0(choice.describe())
    return choice.name


# ----------------------------------------------------------------------------------------------------------------
# data-parallel generation


def processes() -> tuple[int, int]:
    """(number of processes, this one's index): (1, 0) in a plain run; under `accelerate launch` / torchrun
    (WORLD_SIZE > 1) the process group is joined here, and with several GPUs this process takes its own one
    (accelerate's PartialState makes cuda:LOCAL_RANK the current device, where the model then loads)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 1, 0
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.num_processes, state.process_index


def _threads_per_process(world: int) -> int | None:
    """CPU threads of each process: $FLYTHINKER_THREADS, else this machine's cores split between the processes
    on it (each taking all of them would oversubscribe every core)."""
    if world <= 1 or os.environ.get("FLYTHINKER_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))))


def _sum(values: list[int]) -> list[int]:
    """Element-wise sum over all processes (a collective, so also a barrier)."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    t = torch.tensor(values, dtype=torch.int64, device=PartialState().device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _agree(error: UserError | None, what: str) -> None:
    """Raise on every process when any process failed (each raises its own error, or a line pointing to the one
    that failed), so none waits forever at a later collective."""
    if _sum([0 if error is None else 1])[0]:
        raise error or UserError(f"{what}: another process of this data-parallel run failed (see its error)")


def _data_parallel(args: argparse.Namespace, ckpt: Path, data_cfg: Any, decode: Any, examples: list[Any],
                   out: Path, method: str, run: dict[str, str], world: int, rank: int, dtype: str) -> int:
    """Process `rank` of `world` decodes its whole chunks (`predictions.shard_examples`) into
    `<out>.shard-<rank>-of-<world>.jsonl`, resumable like --out and skipping what --out already holds; when every
    process is done the main one merges the shards into --out in input order (atomically) and removes them. The
    chunk seeds are those of the single-process run, so greedy decoding (and sampling) gives its file byte for
    byte. A killed run resumes from the shard files when started again with the same process count."""
    from ..inference import Predictor, load_checkpoint
    from ..predictions import (
        check_resume,
        generate_predictions,
        merge_shards,
        scan_predictions,
        shard_examples,
        shard_files,
        shard_path,
    )

    shard = shard_path(out, rank, world)
    error, done = None, []
    try:
        other = [(n, p) for _, n, p in shard_files(out) if n != world]
        if other:
            n, p = other[0]
            raise UserError(f"{p} was written by a {n}-process data-parallel run; resume it with --num_processes "
                            f"{n}, or delete its shard files to start those examples over")
        # Only the main process takes --out's lock (the others would find it held); every process reads it.
        done = (check_resume if rank == 0 else scan_predictions)(out, method=method, run=run).ids
        check_resume(shard, method=method, run=run)
    except UserError as e:
        error = e
    _agree(error, f"--out {out}")
    model, tokenizer = load_checkpoint(ckpt, dtype, reasoner_device=_reasoner_device(args))
    ids = [e.id for e in examples]
    fn = Predictor(model, tokenizer, data_cfg, decode).batch_fn(ids)
    mine = shard_examples(examples, decode.batch_size, rank, world)
    stats = generate_predictions(mine, fn, shard, batch_size=decode.batch_size, method=method,
                                 progress=not args.no_progress and rank == 0, run=run, skip=done)
    written, repaired = _sum([stats.written, int(stats.repaired)])  # also the barrier: every shard is whole now
    error = None
    if rank == 0:
        try:
            merge_shards(out, ids, world, method=method, run=run)
        except UserError as e:
            error = e
    _agree(error, f"--out {out}")
    if rank == 0:
        note = " (dropped a torn last line first)" if repaired else ""
        print(f"{out}: {written} new, {len(ids) - written} already there, {len(ids)} total, from {world} "
              f"processes{note}")
    return 0

