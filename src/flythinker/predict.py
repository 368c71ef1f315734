"""The `generate` verb: predictions for a dataset, written as resumable JSONL.

Owns: the prediction file format (one JSON object per line: id, user_id, method, prediction, reference, input),
resuming (ids already in the file are skipped; a torn last line left by a kill is dropped and rewritten), the
model-independent core `generate_predictions` (any `predict_batch_fn` works, which is how it is tested), and the CLI
wiring that loads a FlyThinker checkpoint and builds prompts with `flythinker.data`.

Determinism: batches are fixed chunks of the full example list (chunk k = examples[k*B:(k+1)*B]); a resumed run
re-runs only the missing examples of each chunk and seeds chunk k with `seed + k`. Greedy decoding therefore gives
the same file whether or not the run was interrupted; with sampling only the one chunk cut by the kill can differ.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .utils import UserError

PredictBatchFn = Callable[[list[Any]], Sequence[str]]


@dataclass
class DecodeOptions:
    """Decoding flags of `flythinker generate` (passed to `FlyThinker.generate`)."""

    max_new_tokens: int = 512
    """Generated tokens per example at most (the paper used 1536; LongLaMP targets are cut to < 1000)."""
    batch_size: int = 4
    do_sample: bool = False
    """Greedy by default (reproducible); the paper's decoding is --do-sample --temperature 0.8 --top-p 0.95."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    """Chunk k of the data is decoded with seed + k."""

    def __post_init__(self) -> None:
        # Checked here so a bad flag is one line before any model is loaded.
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1; got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1; got {self.batch_size}")
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0; got {self.top_k}")


@dataclass
class GenerateStats:
    total: int
    """Examples asked for."""
    skipped: int
    """Already in the file (resumed)."""
    written: int
    """Written by this run."""
    repaired: bool
    """A torn last line was dropped before resuming."""
    out_path: Path


def _field(ex: Any, name: str, default: Any = None) -> Any:
    return ex.get(name, default) if isinstance(ex, dict) else getattr(ex, name, default)


def scan_predictions(out_path: str | Path, repair: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Read an existing prediction file for resuming: (records, whether a torn tail was dropped).

    Anything after the last newline is what a kill left mid-write; it is cut off (when `repair`) so appending
    continues on a clean line boundary. A malformed *complete* line is not a kill artifact: UserError naming it."""
    path = Path(out_path)
    if not path.exists():
        return [], False
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
    repaired = cut < len(data)
    if repaired and repair:
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
    records = []
    for lineno, raw in enumerate(data[:cut].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:
            raise UserError(f"{path}:{lineno}: malformed prediction line ({e}); fix or remove the file") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise UserError(f"{path}:{lineno}: not a prediction record (an object with an 'id')")
        records.append(rec)
    return records, repaired


def generate_predictions(examples: Sequence[Any], predict_batch_fn: PredictBatchFn, out_path: str | Path,
                         batch_size: int = 8, method: str | None = None, progress: bool = True) -> GenerateStats:
    """Predict every example not yet in `out_path` and append one JSON line each, flushed per batch.

    examples: objects or dicts with id, user_id, output (the reference) and optionally input.
    predict_batch_fn: list of examples -> one prediction string per example, in order.
    method: stored in every line (the name `flythinker evaluate` reports); must match a resumed file's.
    Re-running after a kill (or a crash inside predict_batch_fn) skips what was written and loses nothing."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1; got {batch_size}")
    ids = [str(_field(ex, "id")) for ex in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"example id {dup!r} occurs more than once; resumable generation needs unique ids")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    existing, repaired = scan_predictions(out_path)
    if method is not None:
        other = {r.get("method") for r in existing} - {method}
        if other:
            raise UserError(f"{out_path} holds predictions of method {min(map(str, other))!r}, not "
                            f"{method!r}; use another --out or the same --method-name")
    done = {str(r["id"]) for r in existing}
    skipped = sum(i in done for i in ids)
    written = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(ids), initial=skipped, disable=not progress, desc=method or "generate", unit="ex")
    try:
        with open(out_path, "a", encoding="utf-8") as f:
            for start in range(0, len(examples), batch_size):
                todo = [ex for ex, i in zip(examples[start:start + batch_size], ids[start:start + batch_size])
                        if i not in done]
                if not todo:
                    continue
                preds = list(predict_batch_fn(todo))
                if len(preds) != len(todo):
                    raise RuntimeError(f"predict_batch_fn returned {len(preds)} predictions for {len(todo)} "
                                       f"examples")
                lines = []
                for ex, pred in zip(todo, preds):
                    rec: dict[str, Any] = {"id": str(_field(ex, "id")), "user_id": _field(ex, "user_id")}
                    if method is not None:
                        rec["method"] = method
                    rec["prediction"] = pred
                    rec["reference"] = _field(ex, "output")
                    if _field(ex, "input") is not None:
                        rec["input"] = _field(ex, "input")  # the instruction, for the LLM judge's rubric
                    lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                # One write per batch, then flush + fsync: a kill loses at most this batch, and leaves at most one
                # torn line, which the next run drops.
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
                written += len(todo)
                bar.update(len(todo))
    finally:
        bar.close()
    return GenerateStats(total=len(ids), skipped=skipped, written=written, repaired=repaired, out_path=out_path)


# ----------------------------------------------------------------------------------------------------------------
# model wiring


def decode_new_tokens(row: Sequence[int], tokenizer: Any, eos_ids: Sequence[int]) -> str:
    """Text of one generated row: tokens before the first EOS, special tokens skipped, stripped."""
    ids = [int(t) for t in row]
    for k, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[:k]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def model_predict_fn(model: Any, tokenizer: Any, data_cfg: Any, decode: DecodeOptions,
                     all_ids: Sequence[str] | None = None) -> PredictBatchFn:
    """A `predict_batch_fn` running `model.generate` on prompts built by the data layer.

    all_ids: the full, ordered id list, so a batch is seeded by its chunk index (seed + k) even when resumed."""
    import torch

    from .data import collate, encode_example, pad_token_id

    position = {str(i): k for k, i in enumerate(all_ids or [])}
    pad = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    eos_ids = [int(eos)] if eos is not None else []
    device = next(model.parameters()).device

    def predict(batch: list[Any]) -> list[str]:
        feats = [encode_example(ex, tokenizer, data_cfg, with_response=False) for ex in batch]
        enc = collate(feats, pad, padding_side="left")
        chunk = position.get(str(_field(batch[0], "id")), 0) // decode.batch_size
        with torch.no_grad():
            out = model.generate(enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=decode.max_new_tokens, do_sample=decode.do_sample,
                                 temperature=decode.temperature, top_p=decode.top_p, top_k=decode.top_k,
                                 seed=decode.seed + chunk, eos_token_id=eos_ids or None, pad_token_id=pad)
        return [decode_new_tokens(row, tokenizer, eos_ids) for row in out.tolist()]

    return predict


def _checkpoint_train_config(ckpt: Path) -> dict[str, Any]:
    p = ckpt / "train_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except ValueError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def default_method_name(ckpt: Path) -> str:
    """The trainer's recorded method (e.g. "flythinker", "sft"), else by the presence of a Reasoner."""
    method = (_checkpoint_train_config(ckpt).get("model") or {}).get("method")
    if method:
        return str(method)
    try:
        meta = json.loads((ckpt / "flythinker.json").read_text())
    except (OSError, ValueError):
        return ckpt.name
    return "flythinker" if meta.get("has_reasoner") else "sft"


def load_checkpoint(ckpt: str | Path, dtype: str = "auto"):
    """FlyThinker.from_pretrained(ckpt) on the default device, in eval mode, with its tokenizer."""
    import torch

    from .model import FlyThinker
    from .utils import autocast_dtype, default_device

    ckpt = Path(ckpt)
    device = default_device()
    if dtype == "auto":
        torch_dtype = autocast_dtype(device)
    else:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        model = FlyThinker.from_pretrained(ckpt, dtype=torch_dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"cannot load checkpoint {ckpt}: {str(e).splitlines()[0]}") from None
    if model.tokenizer is None:
        raise UserError(f"{ckpt}/generator has no tokenizer files; save the checkpoint with its tokenizer")
    return model.to(device).eval(), model.tokenizer


def add_cli(parser: argparse.ArgumentParser) -> None:
    from .config import add_dataclass_args
    from .data import DataConfig

    parser.add_argument("--checkpoint", required=True, help="FlyThinker checkpoint directory (save_pretrained / "
                        "trainer output); its tokenizer is read from DIR/generator")
    parser.add_argument("--data", required=True, help="dataset file/directory/LongLaMP config (as `flythinker data`)")
    parser.add_argument("--split", default=None, help="split for directories / hub configs")
    parser.add_argument("--out", required=True, help="predictions JSONL (appended to and resumed if it exists)")
    parser.add_argument("--method-name", default=None,
                        help="name stored in each line (default: the checkpoint's training method)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N examples (0 = all)")
    parser.add_argument("--config", default=None,
                        help="YAML whose `data:` section sets the prompt settings (default: the checkpoint's "
                             "train_config.json, so prompts match training); --data.* flags override both")
    d = DecodeOptions()
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bf16 on a CUDA GPU that supports it, else fp32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_args(parser, DataConfig, prefix="data.")
    parser.set_defaults(func=_cli_main)


def _data_config(args: argparse.Namespace, ckpt: Path):
    """defaults < the checkpoint's train_config.json `data` < --config YAML `data:` < --data.* flags."""
    from .config import from_dict, load_yaml
    from .data import DataConfig

    data: dict[str, Any] = dict(_checkpoint_train_config(ckpt).get("data") or {})
    if args.config:
        loaded = load_yaml(args.config)
        data.update(loaded["data"] if isinstance(loaded.get("data"), dict) else loaded)
    for name, value in vars(args).items():
        if name.startswith("data."):
            data[name[len("data."):]] = value
    return from_dict(DataConfig, data, where=args.config or "data settings")


def _cli_main(args: argparse.Namespace) -> int:
    from .data import load_examples
    from .utils import print0, set_threads

    set_threads()
    ckpt = Path(args.checkpoint)
    if not (ckpt / "flythinker.json").is_file():
        raise UserError(f"{ckpt}: not a FlyThinker checkpoint (no flythinker.json)")
    decode = DecodeOptions(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.do_sample,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    data_cfg = _data_config(args, ckpt)
    examples = load_examples(args.data, task=data_cfg.task, split=args.split)
    if args.limit > 0:
        examples = examples[: args.limit]
    method = args.method_name or default_method_name(ckpt)
    model, tokenizer = load_checkpoint(ckpt, args.dtype)
    fn = model_predict_fn(model, tokenizer, data_cfg, decode, [e.id for e in examples])
    stats = generate_predictions(examples, fn, args.out, batch_size=decode.batch_size, method=method,
                                 progress=not args.no_progress)
    note = " (dropped a torn last line first)" if stats.repaired else ""
    print0(f"{stats.out_path}: {stats.written} new, {stats.skipped} already there, {stats.total} total{note}")
    return 0


__all__ = ["DecodeOptions", "GenerateStats", "add_cli", "decode_new_tokens", "default_method_name",
           "generate_predictions", "load_checkpoint", "model_predict_fn", "scan_predictions"]
