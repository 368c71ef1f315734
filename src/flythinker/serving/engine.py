"""The generation worker: one background thread owns the model and decodes concurrent requests in one batch.

Requests wait in a bounded queue (`QueueFull` when it is full). Two batching modes (`batching=`):

* "continuous" (the default): one running batch (`flythinker.decoding.continuous.RowBatch`). At every step
  boundary the waiting requests join it (prefilled as their own small batch, then merged into the running KV
  caches) up to `max_batch` rows, and rows that finished (EOS, their own max_new_tokens, deadline) or were
  cancelled leave it at once. Rows with different sampling settings share the batch: each row samples with its own
  settings, a seeded row from its own random generator (`RowSampler`), and a row with anti-repetition settings
  (repetition penalty, no-repeat n-grams, min new tokens) runs transformers' processors on its own prompt and
  tokens.
* "wave": the oldest waiting request and every waiting one that can share its decode (same decode settings, up to
  `max_batch`, padded prompt + new tokens within the model's context) run as ONE left-padded batch through the
  shared decode loop (`flythinker.decoding.loop.stream`); requests arriving meanwhile wait for the next wave, and
  ended rows stay in the batch (their output discarded) until the wave ends. The fallback, also taken when the
  model's decode state cannot be resized by rows (`RowsUnsupported`).

Either way each row's new text goes to its own request's sink as soon as it decodes, and greedy text is the same
as the request decoded alone (and as `inference.Predictor` decodes it with the same settings). A method whose decode
reads a second prompt (CoS: the prompt without the user's history) gets it from the request's `extra` prompts. Text is UTF-8 safe: each step decodes the row's ids so far and sends only the new
suffix, holding back a trailing U+FFFD (a character whose bytes span tokens not all decoded yet); leading
whitespace is dropped as `Predictor` strips it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError

log = logging.getLogger("flythinker.serving")


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already."""


@dataclass(frozen=True)
class Sampling:
    """One request's decode settings (`DecodeConfig` fields): how the next token is picked, and the anti-repetition
    settings whose processors read the row's tokens so far."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    penalty_scope: str = "all"

    def anti_repetition(self) -> dict[str, Any]:
        """The anti-repetition settings that are on (empty when none is)."""
        on = {k: v for k, v, off in (("repetition_penalty", self.repetition_penalty, 1.0),
                                     ("no_repeat_ngram_size", self.no_repeat_ngram_size, 0),
                                     ("min_new_tokens", self.min_new_tokens, 0)) if v != off}
        return {**on, "penalty_scope": self.penalty_scope} if on else {}

    def kwargs(self) -> dict[str, Any]:
        """DecodeConfig keyword arguments (for `decoding.loop.stream` and `RowSampler.add`)."""
        if not self.do_sample:
            return {"do_sample": False, **self.anti_repetition()}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, **self.anti_repetition()}


# Events a request's sink receives, in order: Delta* then one of Done / Failed.
@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: ApiError


_serial = itertools.count()


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    sink: Callable[[Any], None]
    deadline: float = float("inf")  # time.monotonic() value
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    serial: int = field(default_factory=lambda: next(_serial))
    extra: dict[str, list[int]] = field(default_factory=dict)
    """Further prompts the model's decode reads, by name: {"plain": ids} goes to the decode as plain_input_ids /
    plain_attention_mask (CoS's prompt without the user's history)."""

    @property
    def batch_key(self) -> tuple:
        s = self.sampling
        anti = tuple(sorted(s.anti_repetition().items()))
        if not s.do_sample:
            return ("greedy", anti)
        if s.seed is not None:
            return ("seeded", self.serial)
        return ("sample", s.temperature, s.top_p, s.top_k, anti)

    def cancel(self) -> None:
        self.cancelled.set()


class _Row:
    """One request's decoding state within a wave."""

    def __init__(self, req: GenerationRequest, tokenizer: Any):
        self.req, self.tok = req, tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.finished = False

    def _text(self) -> str:
        # clean_up_tokenization_spaces=False: the cleanup rewrites text before a new token (" ." -> "."), which would
        # change characters already sent.
        return self.tok.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).lstrip()

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent):
            self.send(Delta(text[len(self.sent):]))
            self.sent = text

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self._text()
        held = text.rstrip("\ufffd")  # an incomplete character: wait for its remaining bytes
        self._emit(held)

    def finish(self, reason: str) -> None:
        self._emit(self._text())  # flush anything held back
        self.finished = True
        self.send(Done(reason, len(self.ids)))

    def fail(self, error: ApiError) -> None:
        self.finished = True
        self.send(Failed(error))

    def send(self, event: Any) -> None:
        try:
            self.req.sink(event)
        except Exception:  # noqa: BLE001 -- a sink whose consumer has gone (closed loop): stop decoding for it
            self.req.cancel()


def collate_prompts(reqs: list[GenerationRequest], pad_id: int, device: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Left-padded (input_ids, attention_mask) of the requests' prompts on `device`, and their extra prompts as
    decode keywords ({"plain_input_ids": (n, T'), "plain_attention_mask": (n, T')} for CoS)."""
    from ..data.collate import collate

    enc = collate([{"prompt_ids": r.prompt_ids} for r in reqs], pad_id, padding_side="left")
    extra: dict[str, Any] = {}
    for name in reqs[0].extra:
        e = collate([{"prompt_ids": r.extra[name]} for r in reqs], pad_id, padding_side="left")
        extra[f"{name}_input_ids"], extra[f"{name}_attention_mask"] = (e["input_ids"].to(device),
                                                                      e["attention_mask"].to(device))
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), extra


def timeout_error() -> ApiError:
    return ApiError(504, "the request exceeded the server's per-request time limit", "timeout_error")


BATCHING = ("continuous", "wave")


class GenerationEngine:
    """The worker thread, its queue and its counters (`stats()`).

    stats: `waves` (wave mode: waves run; continuous: busy periods, i.e. times the batch started from empty),
    `requests` (accepted), `rows` (rows decoded), `joins` (rows that joined a running batch), `prefills` (prefill
    passes), `steps` (token columns), `max_wave` (most rows decoded together), `cancelled`, `timeouts`, `errors`,
    `queue_full` (429s), `queued` (waiting now), `active` (rows in the running batch now), `batching` (the mode).
    """

    def __init__(self, model: Any, tokenizer: Any, eos_ids: list[int], pad_id: int, max_batch: int = 4,
                 max_queue: int = 64, batch_wait_s: float = 0.005, concurrent: bool | str = "auto",
                 cpu_threads: tuple[int, int] | None = None, batching: str = "continuous"):
        from ..hf import context_limit

        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}; got {batching!r}")
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids, self.pad_id = list(eos_ids), int(pad_id)
        self.max_batch, self.max_queue, self.batch_wait_s = int(max_batch), int(max_queue), float(batch_wait_s)
        self.loop_kwargs = {"concurrent": concurrent, "cpu_threads": cpu_threads}
        limits = [context_limit(lm) for _, lm in model.decode_lms()]
        limits = [int(n) for n in limits if n is not None]
        self.context = min(limits) if limits else None
        self._pending: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = {"waves": 0, "requests": 0, "rows": 0, "joins": 0, "prefills": 0, "steps": 0, "max_wave": 0,
                       "cancelled": 0, "timeouts": 0, "errors": 0, "queue_full": 0}
        self._active = 0
        self._lock = threading.Lock()  # guards _stats and _active
        self.batching = batching
        if batching == "continuous":
            from ..decoding.continuous import unsupported_reason

            why = unsupported_reason(model)
            if why:
                log.warning("continuous batching is not available for this model (%s); using wave batching", why)
                self.batching = "wave"

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="flythinker-generation", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail the waiting ones, cancel the running wave's rows, join the thread."""
        with self._cond:
            self._stopping = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for req in waiting:
            _Row(req, self.tokenizer).fail(ApiError(503, "the server is shutting down", "unavailable_error"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
            out["active"] = self._active
        with self._cond:
            out["queued"] = len(self._pending)
        out["batching"] = self.batching
        return out

    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self._stats[k] += v

    # -- submitting ---------------------------------------------------------------------------------------------

    def check_fits(self, n_prompt: int, max_new_tokens: int) -> None:
        """ValueError when a prompt of n_prompt tokens plus max_new_tokens exceeds the model's context (n_prompt:
        the longest of a request's prompts)."""
        if self.context is not None and n_prompt + max_new_tokens > self.context:
            raise ValueError(f"the prompt ({n_prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {self.context} tokens")

    def submit(self, req: GenerationRequest) -> GenerationRequest:
        """Queue a request (QueueFull when the queue is full; ValueError when it cannot fit the context)."""
        if not req.prompt_ids or not all(req.extra.values()):
            raise ValueError("empty prompt")
        self.check_fits(max([len(req.prompt_ids), *map(len, req.extra.values())]), req.max_new_tokens)
        with self._cond:
            if self._stopping or self._thread is None:
                raise ApiError(503, "the generation worker is not running", "unavailable_error")
            if len(self._pending) >= self.max_queue:
                # Requests whose clients gave up (timed out, disconnected) free their places at once rather than
                # when the worker next looks at the queue.
                self._pending = deque(r for r in self._pending if not r.cancelled.is_set())
            if len(self._pending) >= self.max_queue:
                self._count(queue_full=1)
                raise QueueFull(f"{len(self._pending)} requests are waiting already; retry shortly")
            self._pending.append(req)
            self._cond.notify_all()
        self._count(requests=1)
        return req

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling | None = None,
                 timeout: float | None = None, extra: dict[str, list[int]] | None = None) -> tuple[str, Done]:
        """Blocking convenience for one request (tests, scripts): (text, Done); raises the ApiError it failed with."""
        import queue

        q: queue.Queue = queue.Queue()
        deadline = time.monotonic() + timeout if timeout else float("inf")
        self.submit(GenerationRequest(list(prompt_ids), max_new_tokens, sampling or Sampling(), q.put, deadline,
                                      extra=dict(extra or {})))
        pieces = []
        while True:
            ev = q.get()
            if isinstance(ev, Delta):
                pieces.append(ev.text)
            elif isinstance(ev, Done):
                return "".join(pieces), ev
            else:
                raise ev.error

    # -- the worker ---------------------------------------------------------------------------------------------

    def _drop_dead(self, now: float) -> list[tuple[GenerationRequest, str]]:
        """Remove cancelled and expired requests from the queue (called with the lock held)."""
        dead = [(r, "cancelled" if r.cancelled.is_set() else "timeout") for r in self._pending
                if r.cancelled.is_set() or now > r.deadline]
        if dead:
            gone = {id(r) for r, _ in dead}
            self._pending = deque(r for r in self._pending if id(r) not in gone)
        return dead

    def _take_wave(self) -> list[GenerationRequest]:
        """The oldest waiting request and every waiting one that can decode with it (called with the lock held)."""
        first = self._pending[0]
        key = first.batch_key
        wave: list[GenerationRequest] = []
        longest, most_new = 0, 0
        for r in self._pending:
            if len(wave) >= self.max_batch:
                break
            if r.batch_key != key:
                continue
            n, m = max(longest, len(r.prompt_ids), *map(len, r.extra.values())), max(most_new, r.max_new_tokens)
            if wave and self.context is not None and n + m > self.context:
                continue  # the padded batch would not fit: this one waits for a later wave
            wave.append(r)
            longest, most_new = n, m
        taken = {id(r) for r in wave}
        self._pending = deque(r for r in self._pending if id(r) not in taken)
        return wave

    def _wait_for_work(self) -> bool:
        """Block until a request waits, then for the batching window; False when stopping (lock held)."""
        while not self._pending and not self._stopping:
            self._cond.wait()
        if self._stopping:
            return False
        # Batching window: give requests sent at about the same time the chance to share one prefill.
        deadline = self._pending[0].enqueued + self.batch_wait_s
        while not self._stopping and len(self._pending) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        return not self._stopping

    def _report_dead(self, dead: list[tuple[GenerationRequest, str]]) -> None:
        for req, why in dead:
            self._count(**{why: 1})
            if why == "timeout":
                _Row(req, self.tokenizer).fail(timeout_error())

    def _run(self) -> None:
        if self.batching == "continuous":
            self._run_continuous()
        else:
            self._run_waves()

    def _run_waves(self) -> None:
        while True:
            with self._cond:
                if not self._wait_for_work():
                    return
                dead = self._drop_dead(time.monotonic())
                wave = self._take_wave() if self._pending else []
            self._report_dead(dead)
            if wave:
                self._run_wave(wave)

    def _deliver(self, row: _Row, t: int, eos: set[int], now: float) -> None:
        """One sampled token for an unfinished row: end it (cancelled, shutting down, deadline, EOS, length) or
        send its text."""
        if row.req.cancelled.is_set():
            row.finished = True  # its client has gone: nothing more to send
            self._count(cancelled=1)
        elif self._stopping:
            row.fail(ApiError(503, "the server is shutting down", "unavailable_error"))
        elif now > row.req.deadline:
            row.fail(timeout_error())
            self._count(timeouts=1)
        elif t in eos:
            row.finish("stop")
        else:
            row.push(int(t))
            if len(row.ids) >= row.req.max_new_tokens:
                row.finish("length")

    def _run_continuous(self) -> None:
        """The continuous batching loop: join waiting requests, sample one token per row, let ended rows leave,
        step the rest; repeat. A failure fails every row in the batch (500) and starts afresh."""
        import torch

        from ..decoding.continuous import RowBatch, RowSampler

        eos = set(self.eos_ids)
        device = next(self.model.parameters()).device
        batch = RowBatch(self.model, **self.loop_kwargs)
        sampler = RowSampler(eos_token_id=self.eos_ids)
        rows: list[_Row] = []
        logits: Any = None
        while True:
            joiners: list[GenerationRequest] = []
            try:
                with self._cond:
                    if not rows and not self._wait_for_work():
                        return
                    if self._stopping:
                        for row in rows:
                            row.fail(ApiError(503, "the server is shutting down", "unavailable_error"))
                        batch.close()
                        return
                    dead = self._drop_dead(time.monotonic())
                    room = self.max_batch - len(rows)
                    while self._pending and len(joiners) < room:
                        joiners.append(self._pending.popleft())
                self._report_dead(dead)
                if joiners:
                    ids, mask, extra = collate_prompts(joiners, self.pad_id, device)
                    with torch.no_grad():
                        new = batch.add(ids, mask, room=max(r.max_new_tokens for r in joiners), **extra)
                    self._count(waves=0 if rows else 1, joins=len(joiners) if rows else 0, rows=len(joiners),
                                prefills=1)
                    logits = new if logits is None else torch.cat([logits, new.to(logits.device)])
                    for r in joiners:
                        rows.append(_Row(r, self.tokenizer))
                        # the row's own prompt: what its processors read in penalty_scope "all"
                        sampler.add(r.sampling.kwargs(), new.device, prompt_ids=r.prompt_ids)
                    joiners = []
                    with self._lock:
                        self._active = len(rows)
                        self._stats["max_wave"] = max(self._stats["max_wave"], len(rows))
                if not rows:
                    continue
                tokens = sampler.sample(logits)
                self._count(steps=1)
                now = time.monotonic()
                for row, t in zip(rows, tokens.tolist()):
                    self._deliver(row, t, eos, now)
                keep = [i for i, row in enumerate(rows) if not row.finished]
                if len(keep) < len(rows):
                    batch.keep(keep)
                    sampler.keep(keep)
                    rows = [rows[i] for i in keep]
                    with self._lock:
                        self._active = len(rows)
                    if not rows:
                        logits = None
                        continue
                    tokens = tokens.index_select(0, torch.tensor(keep, device=tokens.device))
                with torch.no_grad():
                    logits = batch.step(tokens)
            except Exception as e:
                log.error("continuous batch of %d rows failed", len(rows) + len(joiners), exc_info=e)
                self._count(errors=1)
                for row in rows + [_Row(r, self.tokenizer) for r in joiners]:
                    if not row.finished:
                        row.fail(ApiError(500, "generation failed (see the server log)", "server_error"))
                batch.close()
                batch, rows, logits = RowBatch(self.model, **self.loop_kwargs), [], None
                sampler = RowSampler(eos_token_id=self.eos_ids)
                with self._lock:
                    self._active = 0

    def _run_wave(self, wave: list[GenerationRequest]) -> None:
        import torch

        from ..decoding.loop import stream

        rows = [_Row(r, self.tokenizer) for r in wave]
        self._count(waves=1, rows=len(rows), prefills=1)
        with self._lock:
            self._stats["max_wave"] = max(self._stats["max_wave"], len(rows))
            self._active = len(rows)
        eos = set(self.eos_ids)
        try:
            device = next(self.model.parameters()).device
            ids, mask, extra = collate_prompts(wave, self.pad_id, device)
            kw = dict(max_new_tokens=max(r.max_new_tokens for r in wave), eos_token_id=self.eos_ids or None,
                      pad_token_id=self.pad_id, **wave[0].sampling.kwargs(), **self.loop_kwargs)
            with torch.no_grad():
                # extra prompts go through the model's own stream (CoS's takes plain_input_ids), else the loop's
                cols = self.model.stream(ids, mask, **extra, **kw) if extra else stream(self.model, ids, mask, **kw)
                try:
                    for col in cols:
                        self._count(steps=1)
                        tokens = col.tolist()
                        now = time.monotonic()
                        for row, t in zip(rows, tokens):
                            if not row.finished:
                                self._deliver(row, t, eos, now)
                        if all(r.finished for r in rows):
                            break  # every row ended (or was cancelled): stop the wave at this step
                finally:
                    cols.close()  # runs the loop's cleanup (stepper.close) when the wave stops early
            for row in rows:
                if not row.finished:
                    row.finish("length")
        except Exception as e:
            log.error("generation wave of %d rows failed", len(rows), exc_info=e)
            self._count(errors=1)
            for row in rows:
                if not row.finished:
                    row.fail(ApiError(500, "generation failed (see the server log)", "server_error"))
        finally:
            with self._lock:
                self._active = 0


class AsyncGeneration:
    """A submitted request seen from the event loop: its events through an asyncio.Queue fed thread-safely by the
    worker, the per-request deadline, and cancellation when the consumer stops early (a client that disconnects)."""

    def __init__(self, engine: GenerationEngine, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                 timeout_s: float, extra: dict[str, list[int]] | None = None):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = time.monotonic() + timeout_s
        self.request = GenerationRequest(list(prompt_ids), max_new_tokens, sampling, self._sink, self.deadline,
                                         extra=dict(extra or {}))
        self.finished = False
        engine.submit(self.request)

    def _sink(self, event: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)  # RuntimeError once the loop is closed

    def cancel(self) -> None:
        self.request.cancel()

    async def events(self) -> AsyncIterator[Delta | Done]:
        """Deltas then Done; raises the request's ApiError (a timeout included). Cancels the row when the consumer
        stops iterating before the end."""
        try:
            while True:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise timeout_error()
                try:
                    ev = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    raise timeout_error() from None
                if isinstance(ev, Failed):
                    self.finished = True
                    raise ev.error
                if isinstance(ev, Done):
                    self.finished = True  # before the yield: a consumer may stop iterating right after it
                    yield ev
                    return
                yield ev
        finally:
            if not self.finished:
                self.cancel()

    async def collect(self) -> tuple[str, Done]:
        pieces = []
        async for ev in self.events():
            if isinstance(ev, Delta):
                pieces.append(ev.text)
            else:
                return "".join(pieces), ev
        raise ApiError(500, "generation ended without a result", "server_error")


__all__ = ["BATCHING", "AsyncGeneration", "Delta", "Done", "Failed", "GenerationEngine", "GenerationRequest", "QueueFull",
           "Sampling"]
