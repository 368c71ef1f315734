"""Running two independent calls per decode step concurrently, for any method whose step makes two (FlyThinker:
the Reasoner's step and the Generator's step).

Owns: the backend choice by placement (`resolve_backend`: "sequential", "threads", "process", "cuda_streams",
"two_devices"; "auto" on one CPU device is refined by measurement in `flythinker.decoding.calibrate`), the CPU thread
split by cost (`split_threads`), per-thread intra-op counts (`pinned_threads`, `thread_budget`), the persistent worker
thread, the five backends ("process" runs its side call in `flythinker.decoding.remote`'s worker process), and checking
/ applying a Reasoner placement (`check_device`, `place_reasoner`). Why "auto" chooses as it does, with the
measurements: docs/decode_backends.md. Two threads that must share cores are far worse than either choice (an OpenMP
team whose second thread waits for a busy core stalls every operator), which is why "threads" gives each call its own
thread count.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import torch

from ..config import ConfigError
from .sampling import BACKENDS

# While a "threads" decode holds a caller's thread at its Generator share, the thread count it had before (see
# `Threads`): `thread_budget` reads it so a stepper built meanwhile (a row joining a server's running batch) still
# sees the whole budget.
_PINNED = threading.local()


def thread_budget() -> int:
    """This thread's CPU budget for a decode: torch.get_num_threads(), or, while a "threads" decode holds the thread
    at its Generator share between steps, the count the thread had before that decode."""
    return getattr(_PINNED, "budget", None) or torch.get_num_threads()


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same place (cuda == cuda:0 when 0 is the current device)."""
    if a.type != b.type:
        return False
    if a.type == "cpu" or a.index == b.index:
        return True
    if a.type == "cuda" and (a.index is None or b.index is None):
        cur = torch.cuda.current_device()
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return False


def resolve_backend(g_dev: torch.device, r_dev: torch.device, concurrent: bool | str = "auto",
                    num_threads: int | None = None) -> str:
    """The backend that runs a step's two calls, for models on `g_dev` and `r_dev` (docs/decode_backends.md).

    "auto": two devices -> "two_devices"; one CUDA device -> "cuda_streams"; CPU with >= 4 intra-op threads ->
    "threads"; otherwise "sequential" (on 2-3 cores, giving the first call every core and running the second after
    it is faster than splitting them). True forces the concurrent backend for the placement, False sequential.
    num_threads: the CPU budget (default: the calling thread's, `thread_budget()`). This is the fixed rule; a
    FlyThinker decode asked for "auto" on one CPU device with >= 2 threads measures instead
    (`flythinker.decoding.calibrate`), unless $FLYTHINKER_DECODE_CALIBRATE=0.
    Raises ValueError when a forced backend cannot run here (e.g. cuda_streams without CUDA).
    """
    if concurrent not in (True, False, "auto") and concurrent not in BACKENDS:
        raise ValueError(f"concurrent must be True, False, 'auto' or one of {', '.join(BACKENDS)}; "
                         f"got {concurrent!r}")
    if concurrent is False or concurrent == "sequential":
        return "sequential"
    split = not same_device(g_dev, r_dev)
    if concurrent in ("auto", True):
        if split:
            return "two_devices"
        if g_dev.type == "cuda":
            return "cuda_streams"
        if g_dev.type != "cpu":
            return "sequential"  # e.g. mps: no stream API we rely on
        n = thread_budget() if num_threads is None else num_threads
        return "threads" if concurrent is True or n >= 4 else "sequential"
    if concurrent == "cuda_streams" and not (g_dev.type == "cuda" and not split):
        raise ValueError(f"concurrent='cuda_streams' needs both models on one CUDA device; the Generator is on "
                         f"{g_dev} and the Reasoner on {r_dev}")
    if concurrent == "two_devices" and not split:
        raise ValueError(f"concurrent='two_devices' needs the Reasoner on another device than the Generator "
                         f"(both are on {g_dev}); move it first, e.g. model.reasoner.to('cuda:1')")
    if concurrent in ("threads", "process") and (g_dev.type != "cpu" or split):
        raise ValueError(f"concurrent={concurrent!r} runs both models on CPU cores; the Generator is on {g_dev} and "
                         f"the Reasoner on {r_dev}")
    return concurrent


def split_threads(c_main: int, c_side: int, total: int) -> tuple[int, int]:
    """(main, side) intra-op threads out of `total`, proportional to the two calls' multiply-adds per step, at least
    one each. With total == 1 it returns (1, 1): the side call then takes one extra core beyond the budget."""
    if total <= 1:
        return 1, 1
    n_r = min(total - 1, max(1, round(total * c_side / max(c_main + c_side, 1))))
    return total - n_r, n_r


@contextlib.contextmanager
def pinned_threads(n: int | None) -> Iterator[None]:
    """Set this thread's intra-op thread count for the block and restore it after.

    With torch's OpenMP backend the count is the calling thread's OpenMP ICV (and MKL follows the calling thread's
    OpenMP setting; checked: a worker calling set_num_threads(2) leaves the caller's GEMMs on one core), so the
    caller and the Reasoner's worker thread each keep their own count (per-thread CPU time checked in
    docs/decode_backends.md: no OpenMP team threads are spawned to compete for cores)."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Worker:
    """One persistent daemon thread that runs Reasoner steps. Persistent because thread start-up and OpenMP team
    creation per step would cost more than a small model's step; grad mode is thread-local, so every task runs
    under inference_mode here too."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="flythinker-reasoner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, n_threads, fut = self._tasks.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if n_threads is not None and torch.get_num_threads() != n_threads:
                    torch.set_num_threads(n_threads)  # this thread's own OpenMP count; see pinned_threads
                with torch.inference_mode():
                    fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                fut.set_exception(e)

    def submit(self, fn: Callable[[], Any], n_threads: int | None = None) -> Future:
        fut: Future = Future()
        self._tasks.put((fn, n_threads, fut))
        return fut


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:  # created on first use, never at import
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER


def _join(fut: Future, g_call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run G here while the worker runs R; always wait for R, even when G fails, so no step outlives its session."""
    try:
        logits = g_call()
    finally:
        r = fut.result()
    return r, logits


class Sequential:
    """Both calls one after the other on the caller's thread. Every backend has this interface: `prefill_scope()`
    is the context the prefill runs in, `prefill_side` runs the side call of a prefill, `step(side_call, main_call)`
    returns (side result, main result), `close()` ends the decode."""

    name = "sequential"
    remote = False  # the side call's state stays in this process (see `Processes`)

    def prefill_scope(self) -> contextlib.AbstractContextManager:
        return pinned_threads(thread_budget())  # the budget even while another decode holds this thread at less

    def prefill_side(self, r_call):
        return r_call()

    def step(self, r_call, g_call):
        r = r_call() if r_call is not None else None
        return r, g_call()

    def close(self):
        pass


class Threads(Sequential):
    """R's step on the persistent worker thread with n_r intra-op threads, G's on the caller's with n_g.

    The prefill (R's prompt pass, then G's: sequential by nature) runs on the caller's thread with n_g + n_r
    threads, every core the decode was given; only the per-token steps split them. The caller's thread is set to
    n_g at the first step and kept there until `close()` (on that thread) restores it, rather than set and restored
    around every step: between steps it only samples, and at n_g that sampling opens no OpenMP team whose threads
    could spin on the core R's worker needs at the next step (a likely cost of the old per-step restore, reasoned
    from libgomp's spin-wait, not measured; docs/decode_backends.md)."""

    name = "threads"

    def __init__(self, n_g: int, n_r: int):
        self.n_g, self.n_r = n_g, n_r
        self._worker = _worker()
        self._pinned: tuple[int, int, int | None] | None = None  # (thread id, count to restore, budget before)

    def prefill_scope(self) -> contextlib.AbstractContextManager:
        return pinned_threads(self.n_g + self.n_r)

    def _pin(self) -> None:
        now = torch.get_num_threads()
        if now == self.n_g:
            return
        if self._pinned is None:
            before = getattr(_PINNED, "budget", None)
            self._pinned = (threading.get_ident(), now, before)
            _PINNED.budget = before or now
        torch.set_num_threads(self.n_g)

    def step(self, r_call, g_call):
        fut = self._worker.submit(r_call, self.n_r)
        self._pin()
        return _join(fut, g_call)

    def close(self):
        pinned, self._pinned = self._pinned, None
        # Only the thread that was pinned can be restored (torch's count is per thread); a decode abandoned and
        # collected on another thread leaves its caller at n_g.
        if pinned is not None and pinned[0] == threading.get_ident():
            torch.set_num_threads(pinned[1])
            _PINNED.budget = pinned[2]


class Processes(Threads):
    """The side call in a worker process (`flythinker.decoding.remote`) with n_r intra-op threads, the main call on
    the caller's thread with n_g, pinned as in `Threads`: no GIL is shared between the two calls. The prefill runs
    here with every thread, as for "threads". Its stepper hands the side state over with `session.adopt` at the
    first step, steps with `step_remote` and takes the cache back with `session.release` before another backend
    steps the decode (`remote` tells a stepper to do so)."""

    name = "process"
    remote = True

    def __init__(self, n_g: int, n_r: int):
        from .remote import Session

        self.n_g, self.n_r = n_g, n_r
        self._pinned = None
        self.session = Session()

    def step(self, r_call, g_call):
        raise RuntimeError("the process backend steps through step_remote: its stepper hands over the side state")

    def step_remote(self, tokens: torch.Tensor, t: int, cols: int, unpadded: bool, g_call):
        """(side states (B, 1, H) at step t, g_call's result): see `remote.Session.step`."""
        return self.session.step(tokens, t, cols, unpadded, g_call, before_main=self._pin)

    def close(self):
        self.session.close()
        super().close()


class TwoDevices(Sequential):
    """R's step on the worker thread, issuing work to R's own device, G's on the caller's thread and device. On two
    GPUs both launch streams run asynchronously and the only synchronisation is r_{t-1} moving to G's device inside
    `fuse` (a device-to-device copy ordered on G's stream); a CPU-side model never blocks the other's launches."""

    name = "two_devices"

    def __init__(self, n_r: int | None):
        self.n_r = n_r
        self._worker = _worker()

    def step(self, r_call, g_call):
        return _join(self._worker.submit(r_call, self.n_r), g_call)


class CudaStreams(Sequential):
    """R on a side CUDA stream, G on the current stream of the same device.

    Ordering: the side stream waits for the main stream before R's step (the token column and masks are written
    by the main stream); the main stream waits for the side stream after the step, so the next G step reads
    r_t only once R has written it. Lifetimes: tensors crossing streams are `record_stream`-ed so the caching
    allocator never hands their memory to another stream's kernel while it may still be read. The R cache is
    created on the side stream (prefill runs there), so it never crosses streams. `cuda` is injectable for tests.
    """

    name = "cuda_streams"

    def __init__(self, device: torch.device, cuda: Any = None):
        self.cuda = cuda if cuda is not None else torch.cuda
        self.main = self.cuda.current_stream(device)
        self.side = self.cuda.Stream(device=device)

    def _on_side(self, r_call, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        self.side.wait_stream(self.main)
        with self.cuda.stream(self.side):
            r = r_call()
        for t in inputs:
            _record(t, self.side)
        return r

    def prefill_side(self, r_call):
        states, cache = self._on_side(r_call, getattr(r_call, "inputs", ()))
        self.main.wait_stream(self.side)
        _record(states, self.main)
        return states, cache

    def step(self, r_call, g_call):
        r = self._on_side(r_call, getattr(r_call, "inputs", ()))
        logits = g_call()                          # queued on the main stream, overlapping R's kernels
        self.main.wait_stream(self.side)
        _record(r, self.main)
        return r, logits


def _record(t: torch.Tensor, stream: Any) -> None:
    if t.is_cuda:
        t.record_stream(stream)


def make_backend(name: str, g_dev: torch.device, r_dev: torch.device, cpu_threads: tuple[int, int] | None = None,
                 macs: Callable[[], tuple[int, int]] | None = None):
    """The backend object for `name` (see `resolve_backend`). cpu_threads: (main, side) threads for "threads" and
    "process" (and the side's for a CPU-side "two_devices"); None splits `thread_budget()` by `macs()`, the two
    calls' multiply-adds per step."""
    if name == "sequential":
        return Sequential()
    if name in ("threads", "process"):
        n_g, n_r = cpu_threads or split_threads(*(macs() if macs else (1, 1)), thread_budget())
        return (Threads if name == "threads" else Processes)(n_g, n_r)
    if name == "two_devices":
        n_r = (cpu_threads or (None, None))[1] if r_dev.type == "cpu" else None
        return TwoDevices(n_r)
    return CudaStreams(g_dev)


class Call:
    """A zero-argument callable carrying the tensors it reads (so a stream backend can record them)."""

    __slots__ = ("fn", "inputs")

    def __init__(self, fn: Callable[[], Any], *inputs: torch.Tensor):
        self.fn, self.inputs = fn, inputs

    def __call__(self):
        return self.fn()


def check_device(spec: str | torch.device, field: str = "reasoner_device") -> torch.device:
    """The torch device `spec` names ("cpu", "cuda", "cuda:1", "mps"), checked to exist on this machine; a one-line
    ConfigError naming `field` otherwise (found at the first decode step it would be a deep CUDA error)."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{field}: {spec!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"{field}: {spec} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{field}: {spec} does not exist; this machine has {n} CUDA device(s) "
                              f"(cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{field}: {spec} requested but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ConfigError(f"{field}: {spec} is not supported here (cpu, cuda, cuda:N or mps)")
    return dev


def place_reasoner(model: Any, device: str | torch.device | None, field: str = "reasoner_device") -> Any:
    """Move `model.reasoner` to `device` (checked by `check_device`) and return `model`; "" / None, or a model
    without a Reasoner (SFT and the other one-model methods), leave it as it is. With the Reasoner on another device
    than the Generator, "auto" decodes with "two_devices" (the paper's two-GPU setting)."""
    if device is None or device == "":
        return model
    dev = check_device(device, field)
    reasoner = getattr(model, "reasoner", None)
    if reasoner is not None:
        reasoner.to(dev)
    return model


__all__ = ["BACKENDS", "Call", "CudaStreams", "Processes", "Sequential", "Threads", "TwoDevices", "check_device",
           "make_backend", "pinned_threads", "place_reasoner", "resolve_backend", "same_device", "split_threads",
           "thread_budget"]
