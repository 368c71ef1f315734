"""Running one row of a comparison end to end: (train) -> generate predictions -> measure cost.

A row is a registered method (`flythinker.methods.METHODS`) plus dotted overrides of the experiment's settings
(`MethodSpec`), so every row goes through ONE trainer (`training.loop.fit`) and ONE predictor
(`inference.Predictor`) with the same prompts, decoding and seed. `flythinker demo` and `flythinker study` are both
built on `run_method`. Work is cached per row folder: a finished training (final/) or prediction file is reused, and
an interrupted one resumes, so long studies survive a kill. A model-free method (`Method.model_free`, the copy
floors) writes its predictions through the same writer without any model, and has no cost to measure.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import ConfigError, apply_overrides, to_dict
from ..data import DataConfig, Example, encode_example
from ..decoding.concurrency import place_reasoner
from ..decoding.dtype_choice import choose_decode_dtype, decode_lms
from ..decoding.sampling import DecodeConfig
from ..methods import METHODS, Method, ModelArgs, get_method
from ..safeio import atomic_write_text
from ..training.config import TrainArgs
from ..utils import UserError, dtype_name, resolve_dtype

SECTIONS = ("model", "data", "train", "decode")


@dataclass
class MethodSpec:
    """One row of the comparison table."""

    name: str
    """Display name (also the predictions' `method` field and the folder name)."""
    method: str = "flythinker"
    """A registered method (flythinker.methods.METHODS)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted settings over the experiment's, e.g. {"model.fusion.lam": 0.2, "train.lr_reasoner": 1e-5,
    "decode.copy_bonus": 2}."""
    model_from: str = ""
    """The display name of another row whose trained model this row decodes, instead of training its own (same
    method and model / data / train settings as that row; the study resolves them): a decoding lever is measured
    on the very model it is compared with, without retraining it."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"{self.name}: unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        bad = [k for k in self.overrides if k.split(".", 1)[0] not in SECTIONS or "." not in k]
        if bad:
            raise ConfigError(f"{self.name}: override key(s) {', '.join(bad)} must start with one of "
                              f"{', '.join(s + '.' for s in SECTIONS)}")
        if self.model_from and not self.trained:
            raise ConfigError(f"{self.name}: model_from needs a trained method; {self.method} trains nothing")

    @property
    def impl(self) -> Method:
        return get_method(self.method)

    @property
    def trained(self) -> bool:
        return self.impl.trained

    @property
    def model_free(self) -> bool:
        return getattr(self.impl, "model_free", False)

    def section(self, name: str) -> dict[str, Any]:
        return {k.split(".", 1)[1]: v for k, v in self.overrides.items() if k.split(".", 1)[0] == name}

    def model_args(self, base: ModelArgs) -> ModelArgs:
        return self.impl.model_args(apply_overrides(base, self.section("model"), where=f"{self.name} model"))

    def data_config(self, base: DataConfig) -> DataConfig:
        return self.impl.data_config(apply_overrides(base, self.section("data"), where=f"{self.name} data"))

    def train_args(self, base: TrainArgs) -> TrainArgs:
        return apply_overrides(base, self.section("train"), where=f"{self.name} train")

    def decode_config(self, base: DecodeConfig) -> DecodeConfig:
        return apply_overrides(base, self.section("decode"), where=f"{self.name} decode")

    def trained_dir(self, out_dir: str | Path) -> Path:
        """Where this row's trained model is saved (final/ of its own folder, or of its model_from row's)."""
        return Path(out_dir) / row_folder_name(self.model_from or self.name) / "train" / "final"


@dataclass
class MethodResult:
    name: str
    method: str
    predictions: Path
    train_s_per_step: float | None = None
    train_steps: int = 0
    train_losses: list[float] = field(default_factory=list)
    decode_ms_per_token: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_method_model(spec: MethodSpec, model_args: ModelArgs):
    """Fresh (untrained) model for `spec`: (model, tokenizer)."""
    return spec.impl.build(spec.model_args(model_args))


def run_method(spec: MethodSpec, train_examples: Sequence[Example], eval_examples: Sequence[Example],
               model_args: ModelArgs, data: DataConfig, train: TrainArgs, decode: DecodeConfig,
               out_dir: str | Path, progress: bool = True, log=print, reasoner_device: str = "") -> MethodResult:
    """Train (if the method is trained), then generate predictions for `eval_examples` into
    `out_dir/<name>/predictions.jsonl`, measuring training s/step (decode ms/token: `remeasure_decode`, all
    methods together). reasoner_device: where a Reasoner decodes (e.g. cuda:1; "" = the Generator's device)."""
    from ..models import load_tokenizer
    from ..training.loop import fit
    from .timing import median_step_seconds

    folder = Path(out_dir) / row_folder_name(spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    data_cfg = spec.data_config(data)
    result = MethodResult(spec.name, spec.method, folder / "predictions.jsonl")
    if spec.model_free:
        return _run_model_free(spec, eval_examples, data_cfg, result, progress, log)
    margs = spec.model_args(model_args)
    decode = spec.decode_config(decode)
    timing_file = folder / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    if spec.model_from:
        return _run_shared_model(spec, eval_examples, margs, data_cfg, decode, Path(out_dir), result, timing,
                                 progress, log, reasoner_device)

    targs = dataclasses.replace(spec.train_args(train), out_dir=str(folder / "train"), progress=progress)
    final = Path(targs.out_dir) / "final"
    reuse = spec.trained and (final / "flythinker.json").is_file() and "train_s_per_step" in timing
    cfg = {"model": to_dict(margs), "data": to_dict(data_cfg), "train": to_dict(targs)}
    if reuse:  # a finished training: restore it without first building the fresh models it replaces
        tok = load_tokenizer(margs.generator)
        _check_finished_run(spec, Path(targs.out_dir), cfg, targs, train_examples, tok, data_cfg, margs)
        log(f"[{spec.name}] reusing trained model {final}")
        model = spec.impl.load(final)
        model.tokenizer = tok
    else:
        model, tok = spec.impl.build(margs)
    if spec.trained:
        if not reuse:
            targs.resume = True  # continues from a step-N checkpoint if an earlier run was killed
            feats = spec.impl.features(train_examples, tok, data_cfg, args=margs)
            log(f"[{spec.name}] training on {len(feats)} examples")
            fit_res = fit(model, feats, targs, tok.pad_token_id, config=cfg)
            timing.update(train_s_per_step=fit_res.seconds_per_step, train_steps=fit_res.steps,
                          train_losses=fit_res.losses)
        median = median_step_seconds(Path(targs.out_dir) / "log.jsonl")
        if median is not None:
            timing["train_step_seconds_median"] = median
        atomic_write_text(timing_file, json.dumps(timing, indent=2))  # before generation, so a killed run reuses training
        # The median optimizer-step time (from the loss log; step 1 and checkpoint writes excluded) is the figure
        # compared across methods: every trained row sees the same windows in the same order, and a median is not
        # moved by a burst of load from another process. The wall-clock mean stays in timing.json.
        _record_training(result, timing)
    return _decode_row(spec, model, tok, final, eval_examples, margs, data_cfg, decode, result, timing, progress,
                       log, reasoner_device)


def _run_shared_model(spec: MethodSpec, eval_examples: Sequence[Example], margs: ModelArgs, data_cfg: DataConfig,
                      decode: DecodeConfig, out_dir: Path, result: MethodResult, timing: dict[str, Any],
                      progress: bool, log, reasoner_device: str) -> MethodResult:
    """`run_method` for a row with `model_from`: decode the named row's saved model with this row's decoding. The
    training figures are that row's (it is one training), copied from its timing.json."""
    from ..models import load_tokenizer

    final = spec.trained_dir(out_dir)
    if not (final / "flythinker.json").is_file():
        raise UserError(f"row {spec.name!r} decodes the trained model of row {spec.model_from!r}, and {final} holds "
                        f"none yet; run {spec.model_from!r} first (e.g. name both in --only)")
    source = final.parent.parent / "timing.json"
    shared = json.loads(source.read_text()) if source.is_file() else {}
    for k in ("train_s_per_step", "train_step_seconds_median", "train_steps", "train_losses"):
        if k in shared:
            timing[k] = shared[k]
    timing["model_from"] = spec.model_from
    _record_training(result, timing)
    result.extra["model_from"] = spec.model_from
    log(f"[{spec.name}] decoding the trained model of {spec.model_from} ({final})")
    model = spec.impl.load(final)
    tok = model.tokenizer = load_tokenizer(margs.generator)
    return _decode_row(spec, model, tok, final, eval_examples, margs, data_cfg, decode, result, timing, progress,
                       log, reasoner_device)


def _record_training(result: MethodResult, timing: dict[str, Any]) -> None:
    """A row's training figures from its timing record: the median optimizer-step time where the log gave one."""
    result.train_s_per_step = timing.get("train_step_seconds_median", timing.get("train_s_per_step"))
    result.train_steps = timing.get("train_steps", 0)
    result.train_losses = timing.get("train_losses", [])


def _decode_row(spec: MethodSpec, model: Any, tok: Any, final: Path, eval_examples: Sequence[Example],
                margs: ModelArgs, data_cfg: DataConfig, decode: DecodeConfig, result: MethodResult,
                timing: dict[str, Any], progress: bool, log, reasoner_device: str) -> MethodResult:
    """Generate a row's predictions (resumable, fingerprinted) and record its decode dtype and wall time."""
    from ..inference import (Predictor, checkpoint_fingerprint, data_fingerprint, decode_fingerprint,
                             recorded_decode_dtype)
    from ..predictions import generate_predictions
    from ..safeio import fingerprint

    timing_file = result.predictions.parent / "timing.json"
    # Decode in the faster weights dtype at this batch size (on a CPU with native bf16 measured once and cached,
    # elsewhere the fixed rule: `decoding.dtype_choice`); training kept fp32 master weights. A predictions file
    # already begun keeps the dtype it was begun in, so a resumed study never mixes fp32 and bf16 predictions in one
    # file (the dtype is in the fingerprint) even when a fresh measurement would now choose the other.
    model.eval()
    decode_dtype = recorded_decode_dtype(result.predictions, decode)
    if decode_dtype is None:
        choice = choose_decode_dtype(decode_lms(model), decode.batch_size)
        decode_dtype = choice.dtype
        log(f"[{spec.name}] {choice.describe()}")
    else:
        log(f"[{spec.name}] decode dtype: {dtype_name(decode_dtype)} (as {result.predictions.name} was begun)")
    timing["decode_dtype"] = dtype_name(decode_dtype)  # what remeasure_decode times this row in
    model.to(decode_dtype).eval()
    place_reasoner(model, reasoner_device)

    fn = Predictor(model, tok, data_cfg, decode).batch_fn([e.id for e in eval_examples])
    # Fingerprints in every line: a re-run with another model, data or decode settings is refused, not mixed in.
    run = {"checkpoint": checkpoint_fingerprint(final) if spec.trained
           else fingerprint({"method": spec.method, "model": to_dict(margs)}),
           "data": data_fingerprint(eval_examples, data_cfg), "decode": decode_fingerprint(decode, decode_dtype)}
    t0 = time.perf_counter()
    stats = generate_predictions(list(eval_examples), fn, result.predictions, batch_size=decode.batch_size,
                                 method=spec.name, progress=progress, run=run)
    if stats.written:
        timing["generate_seconds"] = time.perf_counter() - t0
    atomic_write_text(timing_file, json.dumps(timing, indent=2))
    log(f"[{spec.name}] {stats.written} predictions written ({stats.skipped} reused) -> {result.predictions}")
    return result


def _run_model_free(spec: MethodSpec, eval_examples: Sequence[Example], data_cfg: DataConfig,
                    result: MethodResult, progress: bool, log) -> MethodResult:
    """`run_method` for a model-free method: its `predict_texts` through the same resumable predictions writer,
    fingerprinted like every row (the method stands for the checkpoint; there is no decoding to fingerprint). No
    model is built and no cost is recorded (train s/step and decode ms/token stay None)."""
    from ..inference import data_fingerprint
    from ..predictions import generate_predictions
    from ..safeio import fingerprint

    impl = spec.impl
    run = {"checkpoint": fingerprint({"method": spec.method}), "data": data_fingerprint(eval_examples, data_cfg),
           "decode": fingerprint({"model_free": spec.method})}
    stats = generate_predictions(list(eval_examples), lambda batch: impl.predict_texts(batch, data_cfg),
                                 result.predictions, batch_size=64, method=spec.name, progress=progress, run=run)
    log(f"[{spec.name}] {stats.written} predictions written ({stats.skipped} reused) -> {result.predictions}")
    return result


def _check_finished_run(spec: MethodSpec, train_dir: Path, cfg: dict[str, Any], targs: TrainArgs,
                        train_examples: Sequence[Example], tok: Any, data_cfg: DataConfig,
                        margs: ModelArgs) -> None:
    """A finished training is reused only when it is this row's run (same settings and data as now); otherwise a
    one-line error naming what changed, so a changed study config never silently reuses an old model."""
    from ..training.checkpoint import identity_difference, read_run_record, run_identity
    from ..training.loop import resolve_precision

    feats = spec.impl.features(train_examples, tok, data_cfg, args=margs)
    now = run_identity(cfg, {**to_dict(targs), "precision": resolve_precision(targs.precision)}, feats, world_size=1)
    saved = read_run_record(train_dir)
    if saved is None:
        raise UserError(f"{train_dir}: a finished training without run.json (written by an older flythinker?), so "
                        f"it cannot be checked against row {spec.name!r}; delete {train_dir.parent} to retrain it")
    diffs = identity_difference(saved, now, defaults=_setting_defaults()) \
        if saved.get("fingerprint") != now["fingerprint"] else []
    if diffs:
        diff = "; ".join(diffs)
        raise UserError(f"{train_dir} was trained with other settings than row {spec.name!r} now has ({diff}); "
                        f"delete {train_dir.parent} to retrain it, or use another study out folder")


def _setting_defaults() -> dict[str, Any]:
    """The default model / data / train settings: what a run record written before a setting existed is compared
    with (see `training.checkpoint.identity_difference`)."""
    return {"model": to_dict(ModelArgs()), "data": to_dict(DataConfig()), "train": to_dict(TrainArgs())}


def remeasure_decode(results: Sequence[MethodResult], specs: Sequence[MethodSpec], model_args: ModelArgs,
                     data: DataConfig, example: Example, out_dir: str | Path, tokenizer: Any, new_tokens: int = 32,
                     runs: int = 3, log=print, reasoner_device: str = "", concurrent: bool | str = "auto") -> None:
    """Time every method's decoding together, interleaved round-robin (run 1 of each method, then run 2, ...), on
    the same example with each method's own prompt, and overwrite each result's decode_ms_per_token.

    The per-method figure measured right after that method's generation compares moments minutes apart, and on a
    shared or virtualised machine the speed drifts in between; interleaving makes the ratio to SFT a paired
    measurement. Cached in out_dir/decode_timing.json (reused when it covers every method). Model-free rows (the
    copy floors) decode nothing: they are skipped and keep decode_ms_per_token None. Each model decodes as its
    predictions did: the Reasoner on `reasoner_device` when given, with the `concurrent` backend setting."""
    from .timing import time_configs

    pairs = [(spec, res) for spec, res in zip(specs, results) if not spec.model_free]
    results = [res for _, res in pairs]
    if not results:
        return
    cache = Path(out_dir) / "decode_timing.json"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if not all(r.name in saved.get("ms_per_token", {}) for r in results):
        configs, prompts = [], []
        for spec, res in pairs:
            model = (spec.impl.load(spec.trained_dir(out_dir)) if spec.trained
                     else load_method_model(spec, model_args)[0])
            ids = encode_example(example, tokenizer, spec.data_config(data), with_response=False)["prompt_ids"]
            model = model.to(_row_decode_dtype(res, model)).eval()
            configs.append((place_reasoner(model, reasoner_device), None, {"concurrent": concurrent}))
            prompts.append(torch.tensor([ids]))
        log(f"timing decode of {', '.join(r.name for r in results)} (interleaved, {runs} runs x {new_tokens} tokens)")
        timed = time_configs(configs, prompts, new_tokens, runs)
        saved = {"ms_per_token": {r.name: ms for r, (_, ms) in zip(results, timed)},
                 "new_tokens": new_tokens, "runs": runs, "example": example.id}
        atomic_write_text(cache, json.dumps(saved, indent=2))
    for r in results:
        r.decode_ms_per_token = saved["ms_per_token"][r.name]


def _row_decode_dtype(res: MethodResult, model: Any) -> torch.dtype:
    """The dtype a row's predictions were decoded in (its timing.json "decode_dtype"); rows written before that
    was recorded were decoded by the fixed rule."""
    try:
        name = json.loads((res.predictions.parent / "timing.json").read_text()).get("decode_dtype")
    except (OSError, ValueError, AttributeError):
        name = None
    if name in ("float32", "bfloat16", "float16"):
        return getattr(torch, name)
    return resolve_dtype("auto", next(model.parameters()).device)


def row_folder_name(name: str) -> str:
    """A row's folder name under its split: the display name with anything but letters, digits, -_. as _."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def efficiency_table(results: Sequence[MethodResult], baseline: str = "SFT") -> list[dict[str, Any]]:
    """Training s/step and decode ms/token per method, each also as a ratio to the baseline's (None where a figure
    is missing: an untrained row has no s/step, a model-free row neither figure)."""
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
