"""The generation worker: one background thread owns the model and decodes concurrent requests as one batch.

Requests wait in a bounded queue (`QueueFull` when it is full). The worker takes the oldest waiting request and every
other waiting one that can share its decode (same sampling settings, up to `max_batch`, prompt + new tokens within
the model's context), left-pads them into ONE batch and runs it through the shared decode loop
(`flythinker.decoding.loop.stream`), which yields one token column per step for the whole batch. Each row's new text
goes to its own request's sink as soon as it decodes; a row ends at its EOS, at its own max_new_tokens, at its
deadline, or when its client cancels it (a wave whose rows are all finished or cancelled stops at that step).

This is wave batching: a request arriving while a wave runs waits for the next wave. Joining a running wave at a
step boundary (continuous batching) would need the steppers to grow their KV caches by rows mid-decode, which the
decode loop does not offer; see docs/serving.md.

Text is UTF-8 safe: each step decodes the row's ids so far and sends only the new suffix, holding back a trailing
U+FFFD (a character whose bytes span tokens not all decoded yet); leading whitespace is dropped as `Predictor` strips
it. Greedy requests batch together; sampled ones batch by (temperature, top_p, top_k); a seeded sampled request runs
alone, since a batch shares one random generator and its draws would depend on its batch-mates.
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
    """The decode settings a batch shares."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed}


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

    @property
    def batch_key(self) -> tuple:
        s = self.sampling
        if not s.do_sample:
            return ("greedy",)
        if s.seed is not None:
            return ("seeded", self.serial)
        return ("sample", s.temperature, s.top_p, s.top_k)

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


def timeout_error() -> ApiError:
    return ApiError(504, "the request exceeded the server's per-request time limit", "timeout_error")


class GenerationEngine:
    """The worker thread, its queue and its counters (`stats()`: waves, requests, rows decoded per wave, ...)."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: list[int], pad_id: int, max_batch: int = 4,
                 max_queue: int = 64, batch_wait_s: float = 0.005, concurrent: bool | str = "auto",
                 cpu_threads: tuple[int, int] | None = None):
        from ..hf import context_limit

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
        self._stats = {"waves": 0, "requests": 0, "rows": 0, "steps": 0, "max_wave": 0, "cancelled": 0,
                       "timeouts": 0, "errors": 0, "queue_full": 0}
        self._lock = threading.Lock()  # guards _stats

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

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
        with self._cond:
            out["queued"] = len(self._pending)
        return out

    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self._stats[k] += v

    # -- submitting ---------------------------------------------------------------------------------------------

    def check_fits(self, n_prompt: int, max_new_tokens: int) -> None:
        """ValueError when a prompt of n_prompt tokens plus max_new_tokens exceeds the model's context."""
        if self.context is not None and n_prompt + max_new_tokens > self.context:
            raise ValueError(f"the prompt ({n_prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {self.context} tokens")

    def submit(self, req: GenerationRequest) -> GenerationRequest:
        """Queue a request (QueueFull when the queue is full; ValueError when it cannot fit the context)."""
        if not req.prompt_ids:
            raise ValueError("empty prompt")
        self.check_fits(len(req.prompt_ids), req.max_new_tokens)
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
                 timeout: float | None = None) -> tuple[str, Done]:
        """Blocking convenience for one request (tests, scripts): (text, Done); raises the ApiError it failed with."""
        import queue

        q: queue.Queue = queue.Queue()
        deadline = time.monotonic() + timeout if timeout else float("inf")
        self.submit(GenerationRequest(list(prompt_ids), max_new_tokens, sampling or Sampling(), q.put, deadline))
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
            n, m = max(longest, len(r.prompt_ids)), max(most_new, r.max_new_tokens)
            if wave and self.context is not None and n + m > self.context:
                continue  # the padded batch would not fit: this one waits for a later wave
            wave.append(r)
            longest, most_new = n, m
        taken = {id(r) for r in wave}
        self._pending = deque(r for r in self._pending if id(r) not in taken)
        return wave

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                # Batching window: give requests sent at about the same time the chance to share this wave.
                deadline = self._pending[0].enqueued + self.batch_wait_s
                while not self._stopping and len(self._pending) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopping:
                    return
                dead = self._drop_dead(time.monotonic())
                wave = self._take_wave() if self._pending else []
            for req, why in dead:
                self._count(**{why: 1})
                if why == "timeout":
                    _Row(req, self.tokenizer).fail(timeout_error())
            if wave:
                self._run_wave(wave)

    def _run_wave(self, wave: list[GenerationRequest]) -> None:
        import torch

        from ..data.collate import collate
        from ..decoding.loop import stream

        rows = [_Row(r, self.tokenizer) for r in wave]
        self._count(waves=1, rows=len(rows))
        with self._lock:
            self._stats["max_wave"] = max(self._stats["max_wave"], len(rows))
        eos = set(self.eos_ids)
        try:
            enc = collate([{"prompt_ids": r.prompt_ids} for r in wave], self.pad_id, padding_side="left")
            device = next(self.model.parameters()).device
            with torch.no_grad():
                cols = stream(self.model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                              max_new_tokens=max(r.max_new_tokens for r in wave), eos_token_id=self.eos_ids or None,
                              pad_token_id=self.pad_id, **wave[0].sampling.kwargs(), **self.loop_kwargs)
                try:
                    for col in cols:
                        self._count(steps=1)
                        tokens = col.tolist()
                        now = time.monotonic()
                        for row, t in zip(rows, tokens):
                            if row.finished:
                                continue
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


class AsyncGeneration:
    """A submitted request seen from the event loop: its events through an asyncio.Queue fed thread-safely by the
    worker, the per-request deadline, and cancellation when the consumer stops early (a client that disconnects)."""

    def __init__(self, engine: GenerationEngine, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                 timeout_s: float):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = time.monotonic() + timeout_s
        self.request = GenerationRequest(list(prompt_ids), max_new_tokens, sampling, self._sink, self.deadline)
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


__all__ = ["AsyncGeneration", "Delta", "Done", "Failed", "GenerationEngine", "GenerationRequest", "QueueFull",
           "Sampling"]
