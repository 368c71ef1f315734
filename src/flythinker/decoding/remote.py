"""The worker *process* of the "process" decode backend, where the side call of a two-call step (FlyThinker's
Reasoner) runs.

Why a process: two threads of one interpreter re-take the GIL around every torch operator of either model, and on
a small model those hand-offs eat much of what the overlap saves (measured in docs/decode_backends.md).

Owns the worker (`_serve`, spawned on first use, a daemon that ends with its parent; one lock serialises requests),
its protocol (the side model's decoder stack is sent once and keeps its weights in shared memory, so the parent's
later in-place updates are seen; a decode's KV cache, mask and positions are handed over at its first step and
handed back when the decode switches backends; a step sends three integers, the token column and the returned
states travel through preallocated shared buffers) and a decode's side state there (`Session`). The backend built
on it is `concurrency.Processes`. Only a decode whose side cache stays with its stepper can use it: the continuous
batcher resizes caches between steps and keeps them local (`flythinker.decoding.continuous`).
"""

from __future__ import annotations

import itertools
import signal
import sys
import threading
import types
from collections import OrderedDict
from typing import Any

import torch

MAX_MODELS = 4
"""Side models the worker keeps (least recently used dropped first): a bench holds one per dtype."""


def _serve(conn: Any) -> None:
    """The worker's loop: one request at a time, each answered with ("ok", value) or ("err", one line)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which ends this daemon
    models: OrderedDict[str, tuple[Any, str]] = OrderedDict()
    sessions: dict[int, dict[str, Any]] = {}
    torch.set_grad_enabled(False)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            op = msg[0]
            if op == "step":
                _, sid, t, cols, unpadded = msg
                s = sessions[sid]
                mask = None if unpadded else s["mask"][:, :cols]
                with torch.inference_mode():
                    out = s["base"](input_ids=s["tok"], attention_mask=mask, position_ids=s["pos"][:, t - 1: t],
                                    use_cache=True, **{s["kw"]: s["cache"]})
                    s["out"].copy_(out.last_hidden_state)                                       # (B, 1, H)
                reply: Any = None
            elif op == "model":
                _, key, base, kw = msg
                models[key] = (base.eval(), kw)
                while len(models) > MAX_MODELS:
                    models.popitem(last=False)
                reply = None
            elif op == "open":
                _, sid, key, cache, mask, pos, tok, out, threads = msg
                base, kw = models[key]
                models.move_to_end(key)
                if threads and torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                sessions[sid] = {"base": base, "kw": kw, "cache": cache, "mask": mask, "pos": pos, "tok": tok,
                                 "out": out}
                reply = None
            elif op == "release":
                reply = sessions.pop(msg[1])["cache"]
            elif op == "close":
                sessions.pop(msg[1], None)
                reply = None
            elif op == "has":
                reply = msg[1] in models
            else:
                raise ValueError(f"unknown request {op!r}")
            conn.send(("ok", reply))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send(("err", f"{type(e).__name__}: {e}"))


class _Worker:
    """The parent's handle on the worker process: started on first use, one request-reply at a time."""

    def __init__(self) -> None:
        import torch.multiprocessing as mp  # registers the reductions that send tensors as shared memory

        ctx = mp.get_context("spawn")  # never fork: the parent's OpenMP runtime does not survive a fork
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), name="flythinker-reasoner", daemon=True)
        # spawn re-runs the caller's main script in the child unless it is guarded by `if __name__ == "__main__"`;
        # the worker needs nothing from it, so the child is started as if there were no main script.
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self.proc.start()
        finally:
            if main is not None:
                sys.modules["__main__"] = main
        child.close()
        self.lock = threading.Lock()
        self.sent: dict[int, str] = {}  # id(module) -> the key it was sent under

    def send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"the Reasoner worker process is gone ({e}); use --decode.backend threads") from None

    def recv(self) -> Any:
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the Reasoner worker process died (exit code {self.proc.exitcode}); "
                               f"use --decode.backend threads") from None
        if status != "ok":
            raise RuntimeError(f"the Reasoner worker process failed: {value}")
        return value

    def request(self, msg: tuple) -> Any:
        with self.lock:
            self.send(msg)
            return self.recv()

    def model_key(self, base: torch.nn.Module, kw: str) -> str:
        """The worker's key for `base`, sending it first when the worker does not hold these very weights (a new
        module, or one whose parameters were replaced, e.g. by `.to(dtype)`)."""
        key = _weights_key(base)
        if self.sent.get(id(base)) == key and self.request(("has", key)):
            return key
        base.share_memory()  # in place, once: the worker maps the same memory, so it sees later in-place updates
        key = _weights_key(base)
        self.request(("model", key, base, kw))
        self.sent[id(base)] = key
        return key


def _weights_key(base: torch.nn.Module) -> str:
    ps = list(base.parameters())
    return f"{id(base)}:{ps[0].data_ptr() if ps else 0}:{ps[-1].data_ptr() if ps else 0}:{len(ps)}"


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def worker() -> _Worker:
    """The worker process, started on first use (never at import); a dead one is replaced."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None or not _WORKER.proc.is_alive():
            _WORKER = _Worker()
        return _WORKER


_SESSIONS = itertools.count(1)


class Session:
    """One decode's side state held by the worker: `adopt` hands it over, `step` runs one step there, `release`
    takes the cache back, `close` drops it. The "process" backend (`concurrency.Processes`) drives it."""

    def __init__(self) -> None:
        self.w = worker()
        self.sid: int | None = None
        self._tok: torch.Tensor | None = None
        self._out: torch.Tensor | None = None

    @property
    def holds(self) -> bool:
        """Whether the worker holds this decode's side cache."""
        return self.sid is not None

    def adopt(self, base: torch.nn.Module, kw: str, cache: Any, mask: torch.Tensor, step_pos: torch.Tensor,
              hidden: int, dtype: torch.dtype, threads: int | None) -> None:
        """Hand the side model's decode to the worker: `cache` (its KV cache after the prefill), `mask` (B, L)
        the attention-mask buffer over every position the decode may reach, `step_pos` (B, N) each step's
        position, `threads` the worker's intra-op threads. The tensors move to shared memory (in place); the
        parent must not use `cache` until `release` returns it."""
        key = self.w.model_key(base, kw)
        B = mask.shape[0]
        self._tok = torch.zeros(B, 1, dtype=torch.long).share_memory_()                        # (B, 1)
        self._out = torch.zeros(B, 1, hidden, dtype=dtype).share_memory_()                     # (B, 1, H)
        sid = next(_SESSIONS)
        self.w.request(("open", sid, key, cache, mask, step_pos, self._tok, self._out, threads))
        self.sid = sid

    def step(self, tokens: torch.Tensor, t: int, cols: int, unpadded: bool, main_call, before_main=None):
        """One step: the worker feeds `tokens` (B, 1) at step t (mask columns [:cols], none when unpadded) while
        `main_call` runs here (after `before_main`). Returns (the side states (B, 1, H), main_call's result)."""
        w = self.w
        with w.lock:
            self._tok.copy_(tokens)
            w.send(("step", self.sid, t, cols, unpadded))
            try:
                if before_main is not None:
                    before_main()
                result = main_call()
            finally:
                w.recv()  # always wait for the worker's reply, even when main_call failed
            return self._out.clone(), result

    def release(self) -> Any:
        """Take the side cache back from the worker (before another backend steps this decode)."""
        sid, self.sid = self.sid, None
        return self.w.request(("release", sid))

    def close(self) -> None:
        sid, self.sid = self.sid, None
        if sid is not None and self.w.proc.is_alive():
            self.w.request(("close", sid))


__all__ = ["Session", "worker"]
