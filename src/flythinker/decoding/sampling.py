"""Decode settings and sampling: the ONE `DecodeConfig` every caller uses (the API, the generate verb, experiments,
the server), and `sample_next_token`, a pure function of the logits and a seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

BACKENDS = ("sequential", "threads", "cuda_streams", "two_devices")


@dataclass
class DecodeConfig:
    """Settings of one `generate` / `stream` call. Every check raises a one-line ValueError."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens per row (fewer when every row has emitted EOS)."""
    do_sample: bool = False
    """False: greedy (argmax). True: sample from the temperature / top-k / top-p filtered distribution."""
    temperature: float = 1.0
    """Softmax temperature when sampling; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    seed: int | None = None
    """Seeds a private torch.Generator so sampling is reproducible across runs and backends (None: global RNG)."""
    eos_token_id: int | list[int] | None = None
    """Stop ids; None: the Generator's generation_config / config; [] never stops early (benchmarks)."""
    pad_token_id: int | None = None
    """Emitted by rows after their EOS; None: generation_config / config pad id, else the first EOS id, else 0."""
    concurrent: bool | str = "auto"
    """How R's step overlaps G's: "auto", True (the concurrent backend for this placement), False (sequential),
    or a backend name: sequential, threads, cuda_streams, two_devices."""
    cpu_threads: tuple[int, int] | None = None
    """(Generator, Reasoner) intra-op threads for the "threads" backend; None splits the calling thread's
    torch.get_num_threads() by the models' per-token multiply-adds (at least one each)."""
    batch_size: int = 4
    """Rows decoded together by batch callers (the generate verb, experiments, the server); one `generate()` call
    decodes the batch it is given."""

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0; got {self.temperature!r}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {self.batch_size!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it); got {self.top_k!r}")
        c = self.concurrent
        if not (isinstance(c, bool) or c == "auto" or c in BACKENDS):
            raise ValueError(f"concurrent must be True, False, 'auto' or one of {', '.join(BACKENDS)}; got {c!r}")
        if self.cpu_threads is not None:
            t = tuple(self.cpu_threads)
            if len(t) != 2 or any(not isinstance(n, int) or n < 1 for n in t):
                raise ValueError(f"cpu_threads must be two positive ints (generator, reasoner); got {t!r}")
            self.cpu_threads = (t[0], t[1])


def decode_config(kwargs: dict[str, Any]) -> DecodeConfig:
    """DecodeConfig from keyword arguments; an unknown name is a TypeError listing the valid ones."""
    known = {f.name for f in fields(DecodeConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown generation argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return DecodeConfig(**kwargs)


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None = None, do_sample: bool = False,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Pick the next token of every row. Pure: the only state touched is `generator`.

    logits: (B, V) scores of the next position. Filters apply in the usual order: temperature, top-k, top-p.
    generator: a torch.Generator on logits' device (None: torch's global RNG). Returns (B,) LongTensor.
    """
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature                                                # (B, V)
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]                           # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)              # (B, V)
        probs = sorted_scores.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p; the top token always stays
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)                                                       # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)                 # (B,)


__all__ = ["BACKENDS", "DecodeConfig", "decode_config", "sample_next_token"]
