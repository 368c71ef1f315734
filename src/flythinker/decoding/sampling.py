"""Decode settings and next-token selection: the ONE `DecodeConfig` every caller uses (the API, the generate verb,
experiments, the server), `build_logits_processor` (the step's logits processing as transformers'
`LogitsProcessorList`: repetition penalty, no-repeat n-grams, min new tokens, then the sampling warpers, in
transformers' own order), and `sample_next_token`, a pure function of the logits and a seeded generator.

The draw itself stays ours (`torch.multinomial` with a private `torch.Generator`), so seeded runs are reproducible
across backends and batch-mates; what is filtered, and how, is transformers' code."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("sequential", "threads", "process", "cuda_streams", "two_devices")

# Id written into the running sequence at left-padding positions. `apply_processors` maps it (and any id past the
# logits' width) to a spare -inf column it drops afterwards: padding is never penalised and never completes an
# n-gram, so a left-padded row is processed exactly as the same row alone. (transformers' own generate skips the
# padding for the repetition penalty as well, but not for n-grams, where a generated pad id can match the padding.)
NO_TOKEN = 2**62


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    repetition_penalty: float = 1.0
    """Divide the (positive) logits of tokens already in the prompt or output by this, multiply negative ones
    (CTRL's penalty, transformers' RepetitionPenaltyLogitsProcessor); 1 = off, > 1 discourages repeats."""
    no_repeat_ngram_size: int = 0
    """Never generate an n-gram of this many tokens that already occurs in the prompt or output (0 = off)."""
    min_new_tokens: int = 0
    """EOS cannot be picked before this many new tokens per row (0 = off)."""
    penalty_scope: str = "all"
    """What repetition_penalty and no_repeat_ngram_size look at: "all" (prompt and output, as transformers'
    generate does) or "response" (the generated tokens only). For personalization "response" is the one that stops
    loops without also penalizing the words of the user's history that the prompt shows, which are the words a
    personalized answer should reuse."""
    copy_bonus: float = 0.0
    """Added to the logit of every token that continues, somewhere in the prompt, the last copy_ngram - 1
    generated tokens (`HistoryCopyBonus`; 0 = off). Not in the paper: a lever for users whose next text reuses
    long spans of their own history, which a small model rarely reproduces by itself (docs/results.md)."""
    copy_ngram: int = 3
    """The n of copy_bonus: an n-gram of the prompt whose first n - 1 tokens end the response so far proposes its
    last token (>= 2)."""
    seed: int | None = None
    """Seeds a private torch.Generator so sampling is reproducible across runs and backends (None: global RNG)."""
    eos_token_id: int | list[int] | None = None
    """Stop ids; None: the Generator's generation_config / config; [] never stops early (benchmarks)."""
    pad_token_id: int | None = None
    """Emitted by rows after their EOS; None: generation_config / config pad id, else the first EOS id, else 0."""
    concurrent: bool | str = "auto"
    """How R's step overlaps G's: "auto", True (the concurrent backend for this placement), False (sequential),
    or a backend name: sequential, threads, process (the Reasoner in a worker process: no GIL shared with the
    Generator's thread; whole-batch decodes only), cuda_streams, two_devices. "auto" on one CPU device measures the
    candidates once per machine, model pair and batch size (docs/decode_backends.md)."""
    backend: str | None = None
    """The same setting under the name the CLI uses (`--decode.backend threads`): when given it becomes
    `concurrent` and reads back as None, so the decode reads one field."""
    cpu_threads: tuple[int, int] | None = None
    """(Generator, Reasoner) intra-op threads for the "threads" and "process" backends; None splits the calling thread's
    torch.get_num_threads() by the models' per-token multiply-adds (at least one each)."""
    batch_size: int = 4
    """Rows decoded together by batch callers (the generate verb, experiments, the server); one `generate()` call
    decodes the batch it is given."""

    def __post_init__(self) -> None:
        if self.penalty_scope not in ("all", "response"):
            raise ValueError(f"penalty_scope must be 'all' or 'response'; got {self.penalty_scope!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0; got {self.temperature!r}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {self.batch_size!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it); got {self.top_k!r}")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not (rp > 0 and math.isfinite(rp)):
            raise ValueError(f"repetition_penalty must be a number > 0 (1 disables it); got {rp!r}")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0 disables it); "
                             f"got {self.no_repeat_ngram_size!r}")
        cb = self.copy_bonus
        if isinstance(cb, bool) or not isinstance(cb, (int, float)) or not (cb >= 0 and math.isfinite(cb)):
            raise ValueError(f"copy_bonus must be a number >= 0 (0 disables it); got {cb!r}")
        if not _is_int(self.copy_ngram) or self.copy_ngram < 2:
            raise ValueError(f"copy_ngram must be an integer >= 2; got {self.copy_ngram!r}")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0 (0 disables it); got {self.min_new_tokens!r}")
        if self.backend is not None:
            if self.backend != "auto" and self.backend not in BACKENDS:
                raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {self.backend!r}")
            if self.concurrent != "auto" and self.concurrent != self.backend:
                raise ValueError(f"backend {self.backend!r} and concurrent {self.concurrent!r} disagree; set one")
            self.concurrent, self.backend = self.backend, None
        c = self.concurrent
        if not (isinstance(c, bool) or c == "auto" or c in BACKENDS):
            raise ValueError(f"concurrent must be True, False, 'auto' or one of {', '.join(BACKENDS)}; got {c!r}")
        if self.cpu_threads is not None:
            t = tuple(self.cpu_threads)
            if len(t) != 2 or any(not isinstance(n, int) or n < 1 for n in t):
                raise ValueError(f"cpu_threads must be two positive ints (generator, reasoner); got {t!r}")
            self.cpu_threads = (t[0], t[1])

    @property
    def sampled(self) -> bool:
        """True when tokens are drawn (do_sample with a temperature > 0), False for argmax."""
        return bool(self.do_sample) and self.temperature > 0

    @property
    def uses_history(self) -> bool:
        """True when a step's logits depend on the tokens so far (so the loop keeps the running sequence)."""
        return (self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0 or self.min_new_tokens > 0
                or self.copy_bonus > 0)

    @classmethod
    def from_generation_config(cls, generation_config: Any, **overrides: Any) -> DecodeConfig:
        """A DecodeConfig from a `transformers.GenerationConfig`; `overrides` (DecodeConfig fields) win over it.

        Mapped: max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size,
        min_new_tokens, eos_token_id, pad_token_id. Unset (None) fields take DecodeConfig's defaults, not
        transformers' global ones (so top_k stays off rather than 50). A feature this decoder does not implement
        that is set (num_beams > 1, min_p, max_length without max_new_tokens, ...) is a one-line ValueError naming
        them; output flags (output_scores, return_dict_in_generate, ...) and cache settings are ignored.
        """
        gc = generation_config
        unsupported = [name for name, off in _UNSUPPORTED_GENERATION.items()
                       if not _is_off(getattr(gc, name, None), off)]
        if getattr(gc, "max_new_tokens", None) is None and "max_new_tokens" not in overrides \
                and getattr(gc, "max_length", None) is not None:
            unsupported.append("max_length (it counts prompt tokens; set max_new_tokens instead)")
        if unsupported:
            raise ValueError(f"GenerationConfig sets what this decoder does not support: {', '.join(unsupported)}")
        values: dict[str, Any] = {}
        for name in _MAPPED_GENERATION:
            v = getattr(gc, name, None)
            if v is not None:
                values[name] = list(v) if name == "eos_token_id" and isinstance(v, (list, tuple)) else v
        values.update(overrides)
        return decode_config(values)


# GenerationConfig fields with the value meaning "off" (None is off for each): set to anything else, they ask for
# a decoding feature this loop does not implement.
_UNSUPPORTED_GENERATION: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": 0, "diversity_penalty": 0.0,
    "dola_layers": None, "constraints": None, "force_words_ids": None, "min_length": 0, "min_p": None,
    "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None, "guidance_scale": 1.0,
    "exponential_decay_length_penalty": None, "renormalize_logits": False, "remove_invalid_values": False,
    "watermarking_config": None, "stop_strings": None, "max_time": None, "prompt_lookup_num_tokens": None,
    "assistant_early_exit": None, "token_healing": False,
}
_MAPPED_GENERATION = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                      "no_repeat_ngram_size", "min_new_tokens", "eos_token_id", "pad_token_id")


def _is_off(value: Any, off: Any) -> bool:
    return value is None or value == off or (isinstance(value, (list, tuple, dict)) and not value)


def decode_config(kwargs: dict[str, Any]) -> DecodeConfig:
    """DecodeConfig from keyword arguments; an unknown name is a TypeError listing the valid ones. A
    `generation_config` entry (a transformers.GenerationConfig) is the base the other arguments override."""
    kwargs = dict(kwargs)
    gc = kwargs.pop("generation_config", None)
    if gc is not None:
        return DecodeConfig.from_generation_config(gc, **kwargs)
    known = {f.name for f in fields(DecodeConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown generation argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return DecodeConfig(**kwargs)


def _warpers(temperature: float, top_k: int, top_p: float) -> list[Any]:
    """transformers' sampling warpers for these settings, in the order its generate applies them."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out: list[Any] = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        out.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return out


class HistoryCopyBonus:
    """A logits processor (transformers' `LogitsProcessor` call signature) that adds `bonus` to the logit of every
    token y such that the prompt holds the n-gram (last n - 1 response tokens, y): it pulls the decode along spans
    of the user's own history once it has started one. Off until the response has n - 1 tokens, so the prompt's
    own end (the chat template) never proposes anything. A token proposed by several matches gets the bonus once.

    prompt_ids: (B, T) the rows' prompts, padding as `NO_TOKEN` (or any id < 0 or >= the vocabulary), which never
    matches; the ids the processor is called with hold them in their first T columns, then the response."""

    def __init__(self, prompt_ids: torch.Tensor, n: int, bonus: float):
        self.n, self.bonus, self.T = int(n), float(bonus), prompt_ids.shape[1]
        ids = prompt_ids.long()
        if ids.shape[1] >= self.n:
            windows = ids.unfold(1, self.n, 1)                                       # (B, W, n), W = T - n + 1
            self.keys, self.next = windows[..., :-1], windows[..., -1]              # (B, W, n - 1), (B, W)
        else:
            self.keys = self.next = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.T
        if self.keys is None or t < self.n - 1:
            return scores
        width = scores.shape[-1]
        suffix = input_ids[:, -(self.n - 1):].to(self.keys.device)                  # (B, n - 1)
        hit = (self.keys == suffix[:, None, :]).all(dim=-1)                         # (B, W)
        hit &= (self.next >= 0) & (self.next < width)                               # padding proposes nothing
        nxt = torch.where(hit, self.next, torch.zeros_like(self.next))              # (B, W)
        add = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device)   # (B, V)
        add.scatter_add_(1, nxt.to(scores.device), hit.to(device=scores.device, dtype=scores.dtype))  # matches
        return scores + self.bonus * add.clamp(max=1)                              # once per proposed token


def build_logits_processor(cfg: DecodeConfig, eos_ids: Sequence[int] = (), prompt_length: int = 0,
                           device: torch.device | str | None = None, prompt_ids: torch.Tensor | None = None) -> Any:
    """The step's logits processing for `cfg` as a `transformers.LogitsProcessorList`: the history copy bonus
    (ours, `HistoryCopyBonus`, first), then in the order transformers' `GenerationMixin._get_logits_processor`
    builds them: repetition penalty, no-repeat n-grams, min new tokens (only with EOS ids to suppress), then, when
    sampling, temperature, top-k, top-p.

    Call it as `scores = procs(ids, logits)`: ids (B, prompt_length + t) the prompt (left padding as `NO_TOKEN`)
    and the t tokens picked so far, logits (B, V) float. Empty for greedy decoding without penalties.
    prompt_ids: (B, prompt_length) the prompts themselves (padding as `NO_TOKEN`), which the copy bonus reads
    whatever `penalty_scope` hides from the others; required when cfg.copy_bonus > 0.
    """
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    procs = LogitsProcessorList()
    if cfg.copy_bonus > 0:
        if prompt_ids is None:
            raise ValueError("copy_bonus needs the prompts (build_logits_processor(..., prompt_ids=...))")
        procs.append(HistoryCopyBonus(prompt_ids.to(device or "cpu"), cfg.copy_ngram, cfg.copy_bonus))
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(cfg.repetition_penalty)))
    if cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(int(cfg.no_repeat_ngram_size)))
    if cfg.min_new_tokens > 0 and len(eos_ids):
        procs.append(MinNewTokensLengthLogitsProcessor(int(prompt_length), int(cfg.min_new_tokens),
                                                       [int(e) for e in eos_ids], device=device or "cpu"))
    if cfg.sampled:
        procs.extend(_warpers(cfg.temperature, cfg.top_k, cfg.top_p))
    return procs


def apply_processors(procs: Any, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """`procs(ids, logits)` (see `build_logits_processor`) with ids >= V (`NO_TOKEN` padding) pointing at a spare
    -inf column, and a row the processors leave with no allowed token keeping its logits as the stepper gave them:
    a stepper's own constraint (CoT's forced delimiter token, one-hot) wins over an n-gram ban.
    ids: (B, L); logits: (B, V) float; returns (B, V)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    V = logits.shape[-1]
    # The spare column is ours rather than transformers' (which clamps too, but not in every supported version);
    # the warpers, which read no ids, run on the V real columns, so sampling filters exactly as without history.
    warps = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    ids = ids.clamp(max=V)
    scores = F.pad(logits, (0, 1), value=float("-inf"))                                    # (B, V + 1)
    for proc in procs:
        if isinstance(proc, warps) and scores.shape[-1] > V:
            scores = scores[:, :V]
        scores = proc(ids, scores)
    scores = scores[:, :V]                                                                  # (B, V)
    blocked = (scores == float("-inf")).all(dim=-1, keepdim=True)                       # (B, 1)
    return torch.where(blocked, logits, scores)


def pick_token(scores: torch.Tensor, generator: torch.Generator | None, sampled: bool) -> torch.Tensor:
    """(B, V) processed scores -> (B,) ids: the argmax, or one draw from softmax(scores) with `generator`."""
    if not sampled:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)            # (B,)


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None = None, do_sample: bool = False,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Pick the next token of every row. Pure: the only state touched is `generator`.

    logits: (B, V) scores of the next position. Filters are transformers' warpers in its order: temperature,
    top-k, top-p. generator: a torch.Generator on logits' device (None: torch's global RNG). Returns (B,) LongTensor.
    """
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float()                                                              # (B, V)
    for warp in _warpers(temperature, top_k, top_p):
        scores = warp(None, scores)  # the warpers read only the scores
    return pick_token(scores, generator, True)


__all__ = ["BACKENDS", "NO_TOKEN", "DecodeConfig", "HistoryCopyBonus", "apply_processors", "build_logits_processor",
           "decode_config", "pick_token", "sample_next_token"]
