"""Running one method of a comparison end to end: (train) -> generate predictions -> measure cost.

Owns the method catalogue of the paper's comparison (FlyThinker, SFT, RAG, Non-personalized) as configuration
transforms over ONE trainer (`train.fit`) and ONE generator (`predict.generate_predictions` + `FlyThinker.generate`),
so every method sees the same prompts, decoding and seed. `flythinker demo` and `flythinker study` are both built on
`run_method`. Work is cached per method folder: a finished training (final/) or prediction file is reused, and an
interrupted one resumes, so long studies survive a kill.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from .config import to_dict
from .data import DataConfig, Example, encode_example
from .predict import DecodeOptions
from .train import ModelArgs, TrainArgs

Kind = Literal["flythinker", "sft", "rag", "nonpersonalized"]


@dataclass
class MethodSpec:
    """One row of the comparison table."""

    name: str
    """Display name (also the predictions' `method` field and the folder name)."""
    kind: Kind = "flythinker"
    """flythinker (trained R+G), sft (trained G), rag (untrained G, history in prompt), nonpersonalized
    (untrained G, query only)."""
    lam: float | None = None
    """Override λ (None = the experiment's)."""
    scope: str | None = None
    """Override the fusion scope (None = the experiment's)."""
    reasoner: str | None = None
    """Override the Reasoner (an integer k = first k layers; None = the experiment's)."""
    normalize: str | None = None
    """Override FlyThinkerConfig.normalize (None = the experiment's)."""
    lr_reasoner: float | None = None
    """Override the Reasoner's learning rate (None = the experiment's TrainArgs.lr_reasoner)."""

    @property
    def trained(self) -> bool:
        return self.kind in ("flythinker", "sft")


@dataclass
class MethodResult:
    name: str
    kind: str
    predictions: Path
    train_s_per_step: float | None = None
    train_steps: int = 0
    train_losses: list[float] = field(default_factory=list)
    decode_ms_per_token: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def method_data_config(spec: MethodSpec, data: DataConfig) -> DataConfig:
    """Non-personalized sees the query only; every other method gets the same retrieved history."""
    if spec.kind == "nonpersonalized":
        return dataclasses.replace(data, retrieval="none", k=0)
    return data


def method_model_args(spec: MethodSpec, base: ModelArgs) -> ModelArgs:
    args = dataclasses.replace(base, method="flythinker" if spec.kind == "flythinker" else "sft")
    if spec.lam is not None:
        args.lam = spec.lam
    if spec.scope is not None:
        args.scope = spec.scope  # type: ignore[assignment]
    if spec.reasoner is not None:
        args.reasoner = spec.reasoner
    if spec.normalize is not None:
        args.normalize = spec.normalize  # type: ignore[assignment]
    return args


def load_method_model(spec: MethodSpec, model_args: ModelArgs):
    """Fresh (untrained) models for `spec`: (FlyThinker, tokenizer)."""
    from .defaults import load_models
    from .train import build_model

    args = method_model_args(spec, model_args)
    gen, rea, tok = load_models(args.generator, args.reasoner if args.method == "flythinker" else "none")
    return build_model(gen, rea, args, tok), tok


def run_method(spec: MethodSpec, train_examples: Sequence[Example], eval_examples: Sequence[Example],
               model_args: ModelArgs, data: DataConfig, train: TrainArgs, decode: DecodeOptions,
               out_dir: str | Path, progress: bool = True, log=print) -> MethodResult:
    """Train (if the method is trained), then generate predictions for `eval_examples` into
    `out_dir/<name>/predictions.jsonl`, measuring training s/step (decode ms/token: `remeasure_decode`, all
    methods together)."""
    from .model import FlyThinker
    from .predict import generate_predictions, model_predict_fn
    from .train import fit

    folder = Path(out_dir) / _slug(spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    data_cfg = method_data_config(spec, data)
    result = MethodResult(spec.name, spec.kind, folder / "predictions.jsonl")
    timing_file = folder / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}

    targs = dataclasses.replace(train, out_dir=str(folder / "train"), progress=progress)
    if spec.lr_reasoner is not None:
        targs.lr_reasoner = spec.lr_reasoner
    final = Path(targs.out_dir) / "final"
    reuse = spec.trained and (final / "flythinker.json").is_file() and "train_s_per_step" in timing
    if reuse:  # a finished training: restore it without first building the fresh models it replaces
        from .defaults import load_tokenizer

        log(f"[{spec.name}] reusing trained model {final}")
        tok = load_tokenizer(model_args.generator)
        model = FlyThinker.from_pretrained(final, load_tokenizer=False)
        model.tokenizer = tok
    else:
        model, tok = load_method_model(spec, model_args)
    if spec.trained:
        if not reuse:
            targs.resume = True  # continues from a step-N checkpoint if an earlier run was killed
            feats = [encode_example(ex, tok, data_cfg, with_response=True) for ex in train_examples]
            log(f"[{spec.name}] training on {len(feats)} examples")
            cfg = {"model": to_dict(method_model_args(spec, model_args)), "data": to_dict(data_cfg),
                   "train": to_dict(targs)}
            fit_res = fit(model, feats, targs, tok.pad_token_id, config=cfg)
            timing.update(train_s_per_step=fit_res.seconds_per_step, train_steps=fit_res.steps,
                          train_losses=fit_res.losses)
        median = median_step_seconds(Path(targs.out_dir) / "log.jsonl")
        if median is not None:
            timing["train_step_seconds_median"] = median
        timing_file.write_text(json.dumps(timing, indent=2))  # before generation, so a killed run reuses training
        # The median optimizer-step time (from the loss log; step 1 and checkpoint writes excluded) is the figure
        # compared across methods: SFT and FlyThinker see the same windows in the same order, and a median is not
        # moved by a burst of load from another process. The wall-clock mean stays in timing.json.
        result.train_s_per_step = timing.get("train_step_seconds_median", timing.get("train_s_per_step"))
        result.train_steps = timing.get("train_steps", 0)
        result.train_losses = timing.get("train_losses", [])
    model.eval()

    fn = model_predict_fn(model, tok, data_cfg, decode, [e.id for e in eval_examples])
    t0 = time.perf_counter()
    stats = generate_predictions(list(eval_examples), fn, result.predictions, batch_size=decode.batch_size,
                                 method=spec.name, progress=progress)
    if stats.written:
        timing["generate_seconds"] = time.perf_counter() - t0
    timing_file.write_text(json.dumps(timing, indent=2))
    log(f"[{spec.name}] {stats.written} predictions written ({stats.skipped} reused) -> {result.predictions}")
    return result


def median_step_seconds(log_path: Path) -> float | None:
    """Median of the per-step `seconds` in a trainer log.jsonl, skipping step 1 (one-off allocations); None when
    the log is missing or has fewer than two steps."""
    import statistics

    if not log_path.is_file():
        return None
    secs = [r["seconds"] for r in map(json.loads, log_path.read_text().splitlines()) if r.get("step", 0) > 1
            and "seconds" in r]
    return statistics.median(secs) if secs else None


def remeasure_decode(results: Sequence[MethodResult], specs: Sequence[MethodSpec], model_args: ModelArgs,
                     data: DataConfig, example: Example, out_dir: str | Path, tokenizer: Any, new_tokens: int = 32,
                     runs: int = 3, log=print) -> None:
    """Time every method's decoding together, interleaved round-robin (run 1 of each method, then run 2, ...), on
    the same example with each method's own prompt, and overwrite each result's decode_ms_per_token.

    The per-method figure measured right after that method's generation compares moments minutes apart, and on a
    shared or virtualised machine the speed drifts in between; interleaving makes the ratio to SFT a paired
    measurement. Cached in out_dir/decode_timing.json (reused when it covers every method)."""
    from .bench import time_configs
    from .model import FlyThinker

    cache = Path(out_dir) / "decode_timing.json"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if not all(r.name in saved.get("ms_per_token", {}) for r in results):
        configs, prompts = [], []
        for spec, res in zip(specs, results):
            model = (FlyThinker.from_pretrained(res.predictions.parent / "train" / "final", load_tokenizer=False)
                     if spec.trained else load_method_model(spec, model_args)[0])
            ids = encode_example(example, tokenizer, method_data_config(spec, data),
                                 with_response=False)["prompt_ids"]
            configs.append((model.eval(), None, {}))
            prompts.append(torch.tensor([ids]))
        log(f"timing decode of {', '.join(r.name for r in results)} (interleaved, {runs} runs x {new_tokens} tokens)")
        timed = time_configs(configs, prompts, new_tokens, runs)
        saved = {"ms_per_token": {r.name: ms for r, (_, ms) in zip(results, timed)},
                 "new_tokens": new_tokens, "runs": runs, "example": example.id}
        cache.write_text(json.dumps(saved, indent=2))
    for r in results:
        r.decode_ms_per_token = saved["ms_per_token"][r.name]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def efficiency_table(results: Sequence[MethodResult], baseline: str = "SFT") -> list[dict[str, Any]]:
    """Training s/step and decode ms/token per method, each also as a ratio to the baseline's."""
    base = next((r for r in results if r.name == baseline), None)
    rows = []
    for r in results:
        row = {"method": r.name, "train_s_per_step": r.train_s_per_step, "decode_ms_per_token": r.decode_ms_per_token}
        if base is not None:
            row["train_ratio_to_sft"] = (r.train_s_per_step / base.train_s_per_step
                                         if r.train_s_per_step and base.train_s_per_step else None)
            row["decode_ratio_to_sft"] = (r.decode_ms_per_token / base.decode_ms_per_token
                                          if r.decode_ms_per_token and base.decode_ms_per_token else None)
        rows.append(row)
    return rows
