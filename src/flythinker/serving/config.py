"""`ServeConfig`: every setting of `flythinker serve` in one typed dataclass (the model, the database, the address,
the prompt and decode settings, the request bounds), so the verb's flags and a YAML file go through the one config
mechanism (`flythinker.config.add_dataclass_args` / `build_config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

from ..config import ConfigError
from ..data.config import DataConfig
from ..decoding.sampling import DecodeConfig
from ..methods.base import ModelArgs
from ..utils import DTYPES


@dataclass
class Limits:
    """Bounds on what one request may ask of the server. Exceeding one is a 4xx JSON error naming it."""

    max_body_bytes: int = 1_000_000
    """Largest request body accepted (413 beyond it)."""
    max_item_chars: int = 20_000
    """Longest history item text, in characters."""
    max_title_chars: int = 1_000
    """Longest history item title, in characters."""
    max_meta_bytes: int = 10_000
    """Largest item `meta` object, as JSON bytes."""
    max_input_chars: int = 20_000
    """Longest generation request (`input`, or the last user message), in characters."""
    max_new_tokens: int = 1024
    """Cap on a request's max_new_tokens."""
    max_items_per_user: int = 10_000
    """History items a user may hold (409 beyond it); also bounds the work of retrieval per request."""
    max_queue: int = 64
    """Generation requests waiting for the model at most (429 beyond it)."""
    request_timeout_s: float = 300.0
    """Wall-clock limit of one generation request from when it is queued: waiting plus decoding (504 beyond it)."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_item_chars", "max_title_chars", "max_meta_bytes", "max_input_chars",
                     "max_new_tokens", "max_items_per_user", "max_queue"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"limits.{name} must be a positive integer; got {v!r}")
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ConfigError(f"limits.request_timeout_s must be a positive number; got {self.request_timeout_s!r}")


# Methods that train nothing but decode their own way from a fresh model, so `--model.method` may name them here
# (ModelArgs itself names trainable methods only).
SERVABLE_UNTRAINED = ("cos",)


@dataclass(eq=False)
class ServeModelArgs(ModelArgs):
    """`ModelArgs` of the untrained model to serve: any trainable method, or an untrained one that decodes its own
    way (cos: the Generator steered by the history, `model.cos.lam`)."""

    def __post_init__(self) -> None:
        if self.method in SERVABLE_UNTRAINED:
            method, self.method = self.method, "sft"  # the rest of the checks are ModelArgs'
            try:
                super().__post_init__()
            finally:
                self.method = method
            return
        from ..methods import METHODS

        if self.method in METHODS and not METHODS[self.method].trained:
            raise ConfigError(f"model.method {self.method!r} cannot be served: it has no model of its own (serve "
                              f"sft with --data.retrieval for RAG / Non-personalized); untrained methods served: "
                              f"{', '.join(SERVABLE_UNTRAINED)}")
        super().__post_init__()

    def __eq__(self, other: object) -> bool:
        # equal to the ModelArgs with the same settings (`flythinker serve` compares --model.* with the defaults)
        if not isinstance(other, ModelArgs):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(ModelArgs))

    __hash__ = None  # type: ignore[assignment]  -- mutable, like ModelArgs


@dataclass
class ServeConfig:
    """`flythinker serve`: which model, which database, where to listen, and how requests become prompts."""

    checkpoint: str = ""
    """A FlyThinker checkpoint directory (save_pretrained / trainer output). Empty: build the untrained model that
    --model.* names through the method registry."""
    model: ServeModelArgs = field(default_factory=ServeModelArgs)
    """The untrained model to serve when no --checkpoint is given (method, generator, reasoner, fusion); method may
    also be cos (context steering, `model.cos.lam`)."""
    db: str = ""
    """Database URL: sqlite:///PATH or postgresql+psycopg://USER:PASS@HOST/DB. Empty:
    sqlite:///$FLYTHINKER_STATE/flythinker.db (default state dir ~/.local/state/flythinker)."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """TCP port to listen on."""
    name: str = ""
    """Model name in /health, /v1/models and OpenAI responses. Empty: the checkpoint's folder name, or
    "<method>-untrained"."""
    dtype: str = "auto"
    """Weights dtype of the served model: auto (bf16 where the hardware computes it natively: a CUDA GPU with bf16,
    a CPU with AVX512-BF16 or AMX; else fp32), float32, bfloat16 or float16."""
    reasoner_device: str = ""
    """Device of a FlyThinker's Reasoner, e.g. cuda:1 (each model on its own GPU; with decode.backend auto or
    two_devices the two step concurrently) or cpu; empty: the Generator's."""
    batch_wait_ms: float = 5.0
    """How long an idle generation worker waits after a request arrives for others to share its prefill."""
    batching: Literal["continuous", "wave"] = "continuous"
    """continuous: requests join the running batch at the next step and ended rows leave it at once; wave: a batch
    runs to its end before the next starts (the fallback; also used when the model cannot be batched
    continuously)."""
    log_level: str = "info"
    """uvicorn log level (critical, error, warning, info, debug)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt settings (task, retrieval, k, budgets); with --checkpoint the defaults are its training ones."""
    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(max_new_tokens=256))
    """Default decode settings of a request (max_new_tokens, sampling, and the anti-repetition settings the study
    uses: repetition_penalty, no_repeat_ngram_size, min_new_tokens, penalty_scope); decode.batch_size is the most
    requests decoded together in one batch."""
    limits: Limits = field(default_factory=Limits)
    """Request bounds."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535; got {self.port!r}")
        if not (math.isfinite(self.batch_wait_ms) and 0 <= self.batch_wait_ms <= 10_000):
            raise ConfigError(f"batch_wait_ms must be in [0, 10000]; got {self.batch_wait_ms!r}")
        if self.batching not in ("continuous", "wave"):
            raise ConfigError(f"batching must be continuous or wave; got {self.batching!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"log_level must be one of critical, error, warning, info, debug; got "
                              f"{self.log_level!r}")
        if self.reasoner_device:
            from ..decoding.concurrency import check_device

            check_device(self.reasoner_device, "reasoner_device")  # one line now, not a CUDA error at the first step
        if self.decode.concurrent == "process" and self.batching == "continuous":
            raise ConfigError("decode.backend: process keeps the Reasoner's cache in a worker process, which "
                              "continuous batching cannot resize; use threads, sequential or auto, or --batching wave")
        if self.decode.max_new_tokens > self.limits.max_new_tokens:
            raise ConfigError(f"decode.max_new_tokens ({self.decode.max_new_tokens}) exceeds "
                              f"limits.max_new_tokens ({self.limits.max_new_tokens})")


__all__ = ["DTYPES", "SERVABLE_UNTRAINED", "Limits", "ServeConfig", "ServeModelArgs"]
