"""Training settings: `TrainArgs` (optimisation and bookkeeping, the `train:` section of every config) and
`TrainConfig` (everything `flythinker train` reads: the data files and the model / data / train sections).

Both check their values on construction (YAML, flags and the Python API alike), so a NaN learning rate or a
negative count is refused with a one-line error naming the field before anything is loaded or written.

`RESUME_MAY_CHANGE` / `DATA_SOURCE_FIELDS` say which settings a resumed run may change: everything else is part of
a run's identity (see `flythinker.training.checkpoint.run_identity`).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Literal

from ..data.config import DataConfig
from ..methods.base import ModelArgs
from ..utils import UserError

RESUME_MAY_CHANGE = frozenset({"out_dir", "resume", "overwrite", "max_steps", "epochs", "save_every",
                               "keep_checkpoints", "log_every", "save_final", "progress", "threads",
                               "optimizer_impl"})
"""`train.*` fields a resume may change without becoming another run: where the run lives, how long it goes on
(extending max_steps / epochs continues the same run; the learning-rate schedule then follows the new total) and
bookkeeping (saving, logging, progress, threads) or how the same update is computed (optimizer_impl: like
threads, it moves weights by floating-point rounding only). Every other train field (learning rates, batch / accumulation,
schedule shape, seed, precision, clipping, calibration) and every model / data field changes the trajectory, so a
checkpoint written under different values belongs to another run."""

DATA_SOURCE_FIELDS = frozenset({"train_data", "limit"})
"""Top-level fields left out of the identity because the encoded training data itself is fingerprinted instead:
a moved or renamed data file with the same content resumes; different content (or another `limit`) does not."""


@dataclass
class TrainArgs:
    """Optimisation and bookkeeping."""

    out_dir: str = "out/train"
    """Where checkpoints (step-N/, final/) and the loss log (log.jsonl) go."""
    lr_generator: float = 5e-5
    """Peak learning rate of the Generator."""
    lr_reasoner: float = 5e-5
    """Peak learning rate of the Reasoner."""
    lr_projection: float = 1e-3
    """Peak learning rate of the width projection (only when d_R != d_G)."""
    lr_gate: float = 1e-2
    """Peak learning rate of the fusion gate g (only with model.fusion.gate scalar/vector). Far above the LMs':
    Adam moves a parameter by about lr per step, so at 1e-4 over ~25 steps a zero-initialised gate would reach
    only ~0.0025 and the model would stay the SFT model. Never weight-decayed (a scalar / vector parameter)."""
    weight_decay: float = 0.025
    """AdamW weight decay on matrices (not on norms/biases); the official scripts use 0.025."""
    warmup_ratio: float = 0.05
    """Fraction of optimizer steps spent in linear warmup."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = derived from epochs."""
    batch_size: int = 1
    """Examples per micro-batch per process."""
    grad_accum: int = 8
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """How torch computes the AdamW update, the same update each way up to floating-point rounding: fused = one
    kernel per device and dtype for the whole update (CPU and CUDA, any float dtype); foreach = one batched kernel
    per operation of the update;
    for-loop = one parameter at a time (torch's default on CPU, the slowest: at batch 1 without accumulation its
    per-parameter work is a large part of a step). auto = fused on CPU and CUDA, else foreach where torch has
    foreach kernels for the training device, else for-loop.
    Not part of the run identity (see RESUME_MAY_CHANGE): a resume may switch it."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast where the device computes bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX;
    `flythinker.utils.native_bf16`), fp32 elsewhere; bf16 = autocast anywhere. Weights and optimizer state stay in
    the dtype they were loaded in (fp32 unless model.dtype says otherwise). fp32 = no autocast (exact runs)."""
    seed: int = 0
    """Seeds data order, dropout and initialisation."""
    log_every: int = 1
    """Write a loss-log line every N optimizer steps."""
    save_every: int = 0
    """Save a resumable step-N checkpoint every N optimizer steps (0 = only final/)."""
    keep_checkpoints: int = 2
    """How many step-N checkpoints to keep (0 = all)."""
    save_final: bool = True
    """Write out_dir/final/ at the end."""
    resume: bool = False
    """Continue from the newest usable step-N checkpoint in out_dir; it must belong to this run (same settings
    apart from RESUME_MAY_CHANGE, same training data), else the run is refused naming what differs. With no
    checkpoint yet, start at step 0 in out_dir (so a first run and its re-run after a kill share one command)."""
    overwrite: bool = False
    """Delete what an earlier run left in out_dir (step-N/, final/, log.jsonl, run.json) and start at step 0.
    Without it (and without resume) a run into an out_dir holding another run is refused. Wins over resume."""
    calibration_examples: int = 32
    """Training examples whose Reasoner states set the statistics of model.normalize (center/standardize)."""
    threads: int = 0
    """torch intra-op threads (0 = all cores available to this process)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        """Range checks on every field, raising a UserError naming `train.<field>`."""
        hints = typing.get_type_hints(TrainArgs)
        for f in fields(self):
            value = getattr(self, f.name)
            tp = {"float": float, "int": int, "bool": bool, "str": str}.get(str(f.type))
            where = f"train.{f.name}"
            if tp is bool:
                if not isinstance(value, bool):
                    raise UserError(f"{where}: expected true or false; got {value!r}")
            elif tp in (int, float):
                ok = isinstance(value, int) if tp is int else isinstance(value, (int, float))
                if not ok or isinstance(value, bool):
                    raise UserError(f"{where}: expected {'an integer' if tp is int else 'a number'}; got {value!r}")
                if not math.isfinite(value):
                    raise UserError(f"{where}: must be a finite number; got {value!r}")
            elif str(f.type).startswith("Literal"):
                choices = typing.get_args(hints[f.name])
                if value not in choices:
                    raise UserError(f"{where}: must be one of {', '.join(choices)}; got {value!r}")
        _at_least(self, 1, "batch_size", "grad_accum", "log_every")
        _at_least(self, 0, "lr_generator", "lr_reasoner", "lr_projection", "lr_gate", "weight_decay", "max_grad_norm",
                  "epochs", "max_steps", "save_every", "keep_checkpoints", "calibration_examples", "threads")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"train.{name}: must be in [0, 1]; got {getattr(self, name)!r}")
        if self.epochs < 1 and self.max_steps < 1:
            raise UserError("train.epochs / train.max_steps: set train.epochs >= 1 or train.max_steps >= 1")
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise UserError(f"train.out_dir: must be a directory path; got {self.out_dir!r}")


def _at_least(obj: object, low: int, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < low:
            raise UserError(f"train.{name}: must be >= {low}; got {getattr(obj, name)!r}")


@dataclass
class TrainConfig:
    """`flythinker train` configuration: model, data and train sections plus the data files."""

    train_data: str = ""
    """Training examples (generic .jsonl/.jsonl.gz, or LongLaMP json/jsonl/parquet)."""
    limit: int = 0
    """Use only the first N training examples (0 = all)."""
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainArgs = field(default_factory=TrainArgs)

    def __post_init__(self) -> None:
        if not isinstance(self.train_data, str):
            raise UserError(f"train_data: expected a path; got {self.train_data!r}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            raise UserError(f"limit: must be an integer >= 0 (0 = all examples); got {self.limit!r}")
