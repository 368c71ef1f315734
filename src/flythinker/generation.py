"""The decode engine: KV-cached FlyThinker decoding with the Reasoner and the Generator stepping in parallel
(paper Section 3.4, Eq. 10, Algorithm 2).

Owns: the decode settings (`DecodeConfig`), sampling (`sample_next_token`, a pure function), the per-step
Algorithm-2 step (`_Session.parallel_step`), the streaming iterator (`stream`), the batch wrapper (`generate`),
and the concurrency backends that overlap R's step with G's step ("sequential", "threads", "cuda_streams",
"two_devices"). Fusion itself is `FlyThinker.fuse` / `fused_embeddings` / `fusion_mask`: no second implementation.

Choosing a backend ("auto"). Measured on a 2-core CPU, 512-token prompt, batch 1, fp32, ms per new token
(`flythinker bench decode` reproduces it; the first row is the reference in the project's facts, the second this
engine on the `--model medium` pair, a 201M Generator + 57M Reasoner, in a run no other process disturbed):
                                   G alone 1 core | FT sequential 1 core | FT threads 1+1 | G alone 2 | FT seq. 2
  SmolLM2-135M + its first 8 layers:     53.6     |         63.8         |      52.2      |   33.8    |   37.4
  medium pair:                           98.8     |        117.6         |     101.2      |   59.3    |   73.2
  SmolLM2 pair, this engine (11-22):     74.4     |         99.1         |      86.7      |   50.9    |   64.1
The last row (a slower period of the same virtual machine) hides only half of R's step on one core each. Why is
not isolated; a likely cause is that the 576-wide SmolLM2 layers do little compute per token next to fixed
per-layer Python/dispatch costs, which two threads cannot fully overlap.
With the paper's premise (each model has its own compute) concurrency hides R almost completely, but on a machine
with 2 cores in total, giving G both cores and running R after it is faster (73.2 < 101.2): intra-op threads
scale well enough from 1 to 2 cores that taking a core away from G costs more than R's whole step. Hence:
  * fusion off (no Reasoner or λ = 0): "sequential" (G alone, nothing to overlap);
  * R and G on different devices: "two_devices" (each device computes its own model; the paper's setup);
  * one CUDA device: "cuda_streams" (R on a side stream; costs two stream waits per step, never a host sync;
    not measured here: no GPU);
  * CPU with >= 4 intra-op threads: "threads" with the cores split by the models' per-token multiply-adds
    (not measured here; reasoning: batch-1 decode is a chain of memory-bound matrix-vector products whose
    intra-op scaling flattens after a few cores, so a small dedicated share for R beats time-slicing all cores);
  * CPU with 2-3 threads (measured above) or 1 thread: "sequential" with every thread.
Two threads that must share cores are far worse than either choice: an OpenMP team whose second thread waits for a
busy core stalls every operator (10-20x slower per token when another process holds a core), which is why the
"threads" backend gives each model its own thread count (`pinned_threads`) instead of sharing one pool.
`concurrent=True` forces the concurrent backend for the placement (threads on CPU), `False` forces sequential.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .model import FlyThinker, _base_model, cache_kwargs, position_ids_from_mask

BACKENDS = ("sequential", "threads", "cuda_streams", "two_devices")


# ----------------------------------------------------------------------------------------------------------------
# settings


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

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0; got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
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


# ----------------------------------------------------------------------------------------------------------------
# sampling


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


# ----------------------------------------------------------------------------------------------------------------
# cost model and backend choice


def per_token_macs(model: FlyThinker, context: int = 0) -> tuple[int, int]:
    """Multiply-adds per generated token of the Generator (C_G) and the Reasoner (C_R), used to split CPU cores and
    for the benchmark's `flop_ratio` = (C_G + C_R) / C_G.

    Counts every nn.Linear the step runs: G's decoder layers AND its LM head (even when tied to the input
    embedding, the head is a full matrix-vector product), R's decoder layers only (R's head is never run) plus the
    fusion projection; the input embeddings are lookups and cost nothing. With `context` > 0 it adds attention over
    the KV cache: 2 · context · heads · head_dim per layer (scores and the weighted sum of values).
    """
    def linear_macs(module: nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    def attention_macs(lm: nn.Module) -> int:
        cfg = getattr(lm, "config", None)
        layers, heads = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "num_attention_heads", 0)
        if not (context and layers and heads):
            return 0
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return 2 * context * heads * head_dim * layers

    c_g = linear_macs(model.generator) + attention_macs(model.generator)
    c_r = 0
    if model.fusion_enabled:
        c_r = linear_macs(_base_model(model.reasoner)) + attention_macs(model.reasoner)
        if model.projection is not None:
            c_r += model.projection.weight.numel()
    return c_g, c_r


def _device_of(lm: nn.Module) -> torch.device:
    return lm.get_input_embeddings().weight.device


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same place (cuda == cuda:0 when 0 is the current device)."""
    if a.type != b.type:
        return False
    if a.type == "cpu" or a.index == b.index:
        return True
    if a.type == "cuda" and (a.index is None or b.index is None):
        cur = torch.cuda.current_device()
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return False


def resolve_backend(model: FlyThinker, concurrent: bool | str = "auto", num_threads: int | None = None) -> str:
    """The backend name for this model placement and request (see the module docstring for the "auto" rule).

    num_threads: the CPU budget (default: the calling thread's torch.get_num_threads()).
    Raises ValueError when a forced backend cannot run here (e.g. cuda_streams without CUDA).
    """
    if concurrent not in (True, False, "auto") and concurrent not in BACKENDS:
        raise ValueError(f"concurrent must be True, False, 'auto' or one of {', '.join(BACKENDS)}; "
                         f"got {concurrent!r}")
    if not model.fusion_enabled or concurrent is False or concurrent == "sequential":
        return "sequential"  # without fusion there is no Reasoner step to overlap
    g_dev, r_dev = _device_of(model.generator), _device_of(model.reasoner)
    split = not _same_device(g_dev, r_dev)
    if concurrent in ("auto", True):
        if split:
            return "two_devices"
        if g_dev.type == "cuda":
            return "cuda_streams"
        if g_dev.type != "cpu":
            return "sequential"  # e.g. mps: no stream API we rely on
        n = torch.get_num_threads() if num_threads is None else num_threads
        return "threads" if concurrent is True or n >= 4 else "sequential"
    if concurrent == "cuda_streams" and not (g_dev.type == "cuda" and not split):
        raise ValueError(f"concurrent='cuda_streams' needs both models on one CUDA device; the Generator is on "
                         f"{g_dev} and the Reasoner on {r_dev}")
    if concurrent == "two_devices" and not split:
        raise ValueError(f"concurrent='two_devices' needs the Reasoner on another device than the Generator "
                         f"(both are on {g_dev}); move it first, e.g. model.reasoner.to('cuda:1')")
    if concurrent == "threads" and (g_dev.type != "cpu" or split):
        raise ValueError(f"concurrent='threads' runs both models on CPU cores; the Generator is on {g_dev} and "
                         f"the Reasoner on {r_dev}")
    return concurrent


def split_threads(model: FlyThinker, total: int, context: int = 0) -> tuple[int, int]:
    """(Generator, Reasoner) intra-op threads out of `total`, proportional to per-token multiply-adds, at least one
    each. With total == 1 it returns (1, 1): the Reasoner then takes one extra core beyond the budget."""
    if total <= 1:
        return 1, 1
    c_g, c_r = per_token_macs(model, context)
    n_r = min(total - 1, max(1, round(total * c_r / max(c_g + c_r, 1))))
    return total - n_r, n_r


# ----------------------------------------------------------------------------------------------------------------
# concurrency backends: each runs one Reasoner call and one Generator call and returns both results


@contextlib.contextmanager
def pinned_threads(n: int | None) -> Iterator[None]:
    """Set this thread's intra-op thread count for the block and restore it after.

    With torch's OpenMP backend the count is the calling thread's OpenMP ICV (and MKL follows the calling thread's
    OpenMP setting; checked: a worker calling set_num_threads(2) leaves the caller's GEMMs on one core), so the
    caller and the Reasoner's worker thread each keep their own count. Measured (/proc per-thread CPU time) while
    decoding with "threads" 1+1: exactly two OS threads are busy, the caller at ~0.95 core and the worker at
    ~0.2 core (57M Reasoner beside a 201M Generator); no OpenMP team threads are spawned to compete for cores."""
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


class _Sequential:
    name = "sequential"

    def prefill_reasoner(self, r_call):
        return r_call()

    def step(self, r_call, g_call):
        r = r_call() if r_call is not None else None
        return r, g_call()

    def close(self):
        pass


class _Threads(_Sequential):
    """R's step on the persistent worker thread with n_r intra-op threads, G's on the caller's with n_g."""

    name = "threads"

    def __init__(self, n_g: int, n_r: int):
        self.n_g, self.n_r = n_g, n_r

    def step(self, r_call, g_call):
        fut = _worker().submit(r_call, self.n_r)
        with pinned_threads(self.n_g):
            return _join(fut, g_call)


class _TwoDevices(_Sequential):
    """R's step on the worker thread, issuing work to R's own device, G's on the caller's thread and device. On two
    GPUs both launch streams run asynchronously and the only synchronisation is r_{t-1} moving to G's device inside
    `fuse` (a device-to-device copy ordered on G's stream); a CPU-side model never blocks the other's launches."""

    name = "two_devices"

    def __init__(self, n_r: int | None):
        self.n_r = n_r

    def step(self, r_call, g_call):
        return _join(_worker().submit(r_call, self.n_r), g_call)


class _CudaStreams(_Sequential):
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

    def prefill_reasoner(self, r_call):
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


def _make_backend(name: str, model: FlyThinker, cfg: DecodeConfig, context: int):
    if name == "sequential":
        return _Sequential()
    if name == "threads":
        n_g, n_r = cfg.cpu_threads or split_threads(model, torch.get_num_threads(), context)
        return _Threads(n_g, n_r)
    if name == "two_devices":
        r_dev = _device_of(model.reasoner)
        n_r = (cfg.cpu_threads or (None, None))[1] if r_dev.type == "cpu" else None
        return _TwoDevices(n_r)
    return _CudaStreams(_device_of(model.generator))


# ----------------------------------------------------------------------------------------------------------------
# one generation


class _Call:
    """A zero-argument callable carrying the tensors it reads (so a stream backend can record them)."""

    __slots__ = ("fn", "inputs")

    def __init__(self, fn: Callable[[], Any], *inputs: torch.Tensor):
        self.fn, self.inputs = fn, inputs

    def __call__(self):
        return self.fn()


def _accepts(lm: nn.Module, name: str) -> bool:
    import inspect

    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft wrappers forward **kwargs
    try:
        return name in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


class _Session:
    """The state of one generation: two KV caches, the growing attention mask, next positions and r_{t-1}."""

    def __init__(self, model: FlyThinker, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cfg: DecodeConfig, backend: Any):
        self.model, self.cfg, self.backend = model, cfg, backend
        self.fusion = model.fusion_enabled
        self.g_dev = _device_of(model.generator)
        self.r_dev = _device_of(model.reasoner) if self.fusion else self.g_dev
        self.ids = input_ids.to(self.g_dev)
        mask = attention_mask.to(self.g_dev)
        B, T = self.ids.shape
        n = cfg.max_new_tokens
        # The mask only ever grows by columns of ones, so one buffer sliced per step avoids a cat per step.
        self.mask = torch.ones(B, T + n, dtype=mask.dtype, device=self.g_dev)
        self.mask[:, :T] = mask
        self.mask_r = self.mask.to(self.r_dev)
        self.prompt_pos = position_ids_from_mask(mask)                                 # (B, T)
        # Position of generated token t (t = 1..n-1 fed back) is each row's last prompt position + t.
        self.step_pos = self.prompt_pos[:, -1:] + torch.arange(1, n + 1, device=self.g_dev)  # (B, n)
        self.step_pos_r = self.step_pos.to(self.r_dev)
        self.T, self.t = T, 0
        self.keep_logits = {"logits_to_keep": 1} if _accepts(model.generator, "logits_to_keep") else {}
        self.g_cache: Any = None
        self.r_cache: Any = None
        self.r_prev: torch.Tensor | None = None
        self.emb_norm: torch.Tensor | None = None
        self.step_fusion: torch.Tensor | None = None

    def _new_cache(self, lm: nn.Module):
        from transformers import DynamicCache

        return DynamicCache(config=lm.config)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """One pass of each model over the whole prompt. Returns G's logits of the first new token (B, V)."""
        model, ids = self.model, self.ids
        mask = self.mask[:, : self.T]
        self.g_cache = self._new_cache(model.generator)
        self.g_kw = cache_kwargs(model.generator, self.g_cache)  # {keyword: G's cache}, looked up once per session
        if not self.fusion:
            out = model.generator(input_ids=ids, attention_mask=mask, position_ids=self.prompt_pos,
                                  **self.g_kw, use_cache=True, **self.keep_logits)
            return out.logits[:, -1].float()
        ids_r, pos_r = ids.to(self.r_dev), self.prompt_pos.to(self.r_dev)
        self.r_cache = self._new_cache(model.reasoner)
        mask_r = self.mask_r[:, : self.T]
        r_call = _Call(lambda: model.reason(ids_r, mask_r, position_ids=pos_r, past_key_values=self.r_cache,
                                            use_cache=True), ids_r, pos_r, mask_r)
        states, self.r_cache = self.backend.prefill_reasoner(r_call)                 # (B, T, H_R)
        # Prompt positions are "input" for scope; the fusion mask leaves each row's first real token unfused.
        zeros = torch.zeros_like(ids, dtype=torch.bool)
        embeds, _ = model.fused_embeddings(ids, mask, response_mask=zeros, reasoner_states=states)  # (B, T, H_G)
        out = model.generator(inputs_embeds=embeds, attention_mask=mask, position_ids=self.prompt_pos,
                              **self.g_kw, use_cache=True, **self.keep_logits)
        self.r_prev = states[:, -1:]                     # (B, 1, H_R): r at the last prompt position (left padding)
        # Constant across steps: one vocabulary-wide norm, and the fusion mask of a generated token (a response
        # position whose predecessor is real), both computed once instead of per step.
        self.emb_norm = model.embedding_norm() if model.config.rescale else None
        ones = torch.ones(ids.shape[0], 1, dtype=torch.bool, device=self.g_dev)
        self.step_fusion = model.fusion_mask(ones, response_mask=ones, prev_attention=ones[:, 0])  # (B, 1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def parallel_step(self, y_t: torch.Tensor) -> torch.Tensor:
        """Algorithm 2, one step: feed token y_t (B,) to both models at once; return G's next logits (B, V).

        (Parallel) R:  r_t     <- R(x_<t, y_t)                  (B, 1) -> (B, 1, H_R), appended to R's cache
        (Parallel) G:  P_{t+1} <- G(e_<t, e(y_t) + λ·r_{t-1})    (B, 1, H_G) -> (B, V), appended to G's cache
        The calls share no data (G reads r_{t-1}, R writes r_t), so the backend may run them concurrently.
        """
        model = self.model
        self.t += 1
        cols = self.T + self.t                                   # cached positions after this step
        y = y_t[:, None]                                         # (B, 1)
        mask_g, pos_g = self.mask[:, :cols], self.step_pos[:, self.t - 1: self.t]
        if not self.fusion:
            out = model.generator(input_ids=y, attention_mask=mask_g, position_ids=pos_g,
                                  **self.g_kw, use_cache=True)
            return out.logits[:, -1].float()
        y_r = y.to(self.r_dev, non_blocking=True)
        mask_r, pos_r = self.mask_r[:, :cols], self.step_pos_r[:, self.t - 1: self.t]
        r_prev = self.r_prev

        def g_call() -> torch.Tensor:
            emb = model.generator.get_input_embeddings()(y)                                 # (B, 1, H_G)
            emb = model.fuse(emb, r_prev, self.step_fusion, emb_norm=self.emb_norm)         # e(y_t) + λ·r_{t-1}
            out = model.generator(inputs_embeds=emb, attention_mask=mask_g, position_ids=pos_g,
                                  **self.g_kw, use_cache=True)
            return out.logits[:, -1].float()                                                # (B, V)

        r_call = _Call(lambda: model.reason(y_r, mask_r, position_ids=pos_r, past_key_values=self.r_cache,
                                            use_cache=True)[0], y_r, mask_r, pos_r)         # (B, 1, H_R)
        self.r_prev, logits = self.backend.step(r_call, g_call)
        return logits


# ----------------------------------------------------------------------------------------------------------------
# public API


def _check_inputs(model: FlyThinker, input_ids: Any, attention_mask: Any, cfg: DecodeConfig) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) LongTensor; got {shape}")
    if input_ids.numel() == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         f"must have the same shape")
    m = attention_mask.long()
    lengths = m.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"empty prompt: row {int((lengths == 0).nonzero()[0])} of attention_mask has no tokens")
    # Left padding means each row is zeros then ones; decoding appends after the last column, so right padding
    # (or holes) would put new tokens after pads with wrong positions.
    if (m[:, 1:] < m[:, :-1]).any() or not bool((m[:, -1] == 1).all()):
        raise ValueError("prompts must be left-padded (zeros then ones in each attention_mask row); set "
                         "tokenizer.padding_side = 'left'")
    longest = int(lengths.max())
    lms = [("Generator", model.generator)] + ([("Reasoner", model.reasoner)] if model.fusion_enabled else [])
    for name, lm in lms:
        limit = getattr(getattr(lm, "config", None), "max_position_embeddings", None)
        if limit is not None and longest + cfg.max_new_tokens > limit:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the "
                             f"{name}'s context of {limit} positions")
    return attention_mask


def _config_ids(model: FlyThinker, name: str) -> Any:
    for src in (getattr(model.generator, "generation_config", None), getattr(model.generator, "config", None)):
        v = getattr(src, name, None)
        if v is not None:
            return v
    return None


def _special_ids(model: FlyThinker, cfg: DecodeConfig) -> tuple[list[int], int]:
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else _config_ids(model, "eos_token_id")
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else _config_ids(model, "pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


def _decode_config(kwargs: dict[str, Any]) -> DecodeConfig:
    known = {f.name for f in fields(DecodeConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown generation argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return DecodeConfig(**kwargs)


def stream(model: FlyThinker, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           streamer: Any = None, **kwargs: Any) -> Iterator[torch.Tensor]:
    """Decode step by step, yielding each new token column (B,) as soon as it is picked.

    input_ids / attention_mask: (B, T) left-padded prompt. kwargs: `DecodeConfig` fields. Rows that have emitted
    EOS yield pad_token_id; iteration stops when every row is done or after max_new_tokens columns.
    streamer: optional object with put/end (transformers' TextStreamer works): it gets the prompt first, then every
    column (as transformers' generate does), then end().
    Bad input raises here, before the first next(); decoding starts on the first next().
    """
    cfg = _decode_config(kwargs)
    attention_mask = _check_inputs(model, input_ids, attention_mask, cfg)
    return _stream(model, input_ids, attention_mask, cfg, streamer)


def _stream(model: FlyThinker, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig,
            streamer: Any) -> Iterator[torch.Tensor]:
    eos_ids, pad = _special_ids(model, cfg)
    name = resolve_backend(model, cfg.concurrent)
    backend = _make_backend(name, model, cfg, context=input_ids.shape[1] + cfg.max_new_tokens // 2)
    was_training = model.training
    model.eval()  # dropout off; restored on exit
    session = _Session(model, input_ids, attention_mask, cfg, backend)
    g_dev = session.g_dev
    rng = torch.Generator(device=g_dev).manual_seed(cfg.seed) if cfg.seed is not None else None
    eos = torch.tensor(eos_ids, dtype=torch.long, device=g_dev)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=g_dev)
    try:
        if streamer is not None:
            streamer.put(input_ids.detach().cpu())
        logits = session.prefill()                                                    # (B, V)
        for t in range(cfg.max_new_tokens):
            with torch.inference_mode():
                raw = sample_next_token(logits, rng, cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p)
                col = torch.where(done, torch.full_like(raw, pad), raw)               # (B,)
                done = done | torch.isin(raw, eos)
                finished = bool(done.all()) or t == cfg.max_new_tokens - 1            # the one host sync a step
            col = col.clone()  # a normal tensor for the caller (inference tensors refuse in-place updates)
            if streamer is not None:
                streamer.put(col.cpu())
            yield col
            if finished:
                break
            # Finished rows keep feeding their (valid) sampled id: their outputs are discarded anyway.
            logits = session.parallel_step(raw)
    finally:
        backend.close()
        model.train(was_training)
        if streamer is not None:
            streamer.end()


def generate(model: FlyThinker, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             streamer: Any = None, **kwargs: Any) -> torch.Tensor:
    """KV-cached FlyThinker decoding (Algorithm 2) of a left-padded batch.

    input_ids / attention_mask: (B, T). kwargs: `DecodeConfig` fields (max_new_tokens, do_sample, temperature,
    top_p, top_k, seed, eos_token_id, pad_token_id, concurrent, cpu_threads). Returns a LongTensor (B, N) of the
    new tokens only, N <= max_new_tokens, each row padded with pad_token_id after its EOS.
    """
    cfg = _decode_config(kwargs)
    attention_mask = _check_inputs(model, input_ids, attention_mask, cfg)
    cols = list(_stream(model, input_ids, attention_mask, cfg, streamer))
    return torch.stack(cols, dim=1)


__all__ = ["BACKENDS", "DecodeConfig", "generate", "per_token_macs", "pinned_threads", "resolve_backend",
           "sample_next_token", "split_threads", "stream"]
