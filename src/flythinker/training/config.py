"""Training settings: `TrainArgs` (optimisation and bookkeeping, the `train:` section of every config) and
`TrainConfig` (everything `flythinker train` reads: the data files and the model / data / train sections)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..data.config import DataConfig
from ..methods.base import ModelArgs
from ..utils import UserError


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
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast where the device supports it natively (CUDA), fp32 elsewhere."""
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
    """Continue from the newest complete step-N checkpoint in out_dir."""
    calibration_examples: int = 32
    """Training examples whose Reasoner states set the statistics of model.normalize (center/standardize)."""
    threads: int = 0
    """torch intra-op threads (0 = all cores available to this process)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise UserError("train.batch_size and train.grad_accum must be >= 1")
        if self.epochs < 1 and self.max_steps < 1:
            raise UserError("set train.epochs >= 1 or train.max_steps >= 1")


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
