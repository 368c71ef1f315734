"""FlyThinker's decode step (paper Section 3.4, Eq. 10, Algorithm 2): the Reasoner and the Generator each keep
their own KV cache and step on the same token at once; G's input is e(y_t) + λ·r_{t-1}.

Owns the per-decode state (`FlyThinkerStepper`), the cost model used to split CPU cores and by the benchmarks
(`per_token_macs`), and the backend choice for a model's placement (`resolve_backend`, `split_threads`,
`choose_backend`: "auto" on one CPU device measures, `flythinker.decoding.calibrate`). The loop around it is
`flythinker.decoding.loop`; fusion itself is the model's `fuse` / `fused_embeddings` / `fusion_mask`, so decoding
and training share one implementation. `model` below is a FlyThinker (not imported: the model imports this module
to build its decoder).
"""

from __future__ import annotations

from typing import Any

import torch

from ...decoding import calibrate, concurrency
from ...decoding.concurrency import Call
from ...decoding.loop import PromptState
from ...decoding.sampling import DecodeConfig
from ...flops import attention_macs, linear_macs
from ...hf import accepts, base_model, cache_kwargs, device_of, new_cache


def per_token_macs(model: Any, context: int = 0) -> tuple[int, int]:
    """Multiply-adds per generated token of the Generator (C_G) and the Reasoner (C_R), used to split CPU cores and
    for the benchmarks' `flop_ratio` = (C_G + C_R) / C_G.

    Counts every nn.Linear the step runs: G's decoder layers AND its LM head (even when tied to the input
    embedding, the head is a full matrix-vector product), R's decoder layers only (R's head is never run) plus the
    fusion projection; the input embeddings are lookups and cost nothing. With `context` > 0 it adds attention over
    the KV cache (`flythinker.flops.attention_macs`).
    """
    c_g = linear_macs(model.generator) + attention_macs(model.generator, context)
    c_r = 0
    if model.fusion_enabled:
        c_r = linear_macs(base_model(model.reasoner)) + attention_macs(model.reasoner, context)
        if model.projection is not None:
            c_r += model.projection.weight.numel()
    return c_g, c_r


def resolve_backend(model: Any, concurrent: bool | str = "auto", num_threads: int | None = None) -> str:
    """The backend for this model's placement; without fusion there is no Reasoner step to overlap."""
    if not model.fusion_enabled:
        if concurrent not in (True, False, "auto") and concurrent not in concurrency.BACKENDS:
            raise ValueError(f"concurrent must be True, False, 'auto' or one of {', '.join(concurrency.BACKENDS)}; "
                             f"got {concurrent!r}")
        return "sequential"
    return concurrency.resolve_backend(device_of(model.generator), device_of(model.reasoner), concurrent,
                                       num_threads)


def split_threads(model: Any, total: int, context: int = 0) -> tuple[int, int]:
    """(Generator, Reasoner) intra-op threads out of `total`, proportional to per-token multiply-adds."""
    return concurrency.split_threads(*per_token_macs(model, context), total)


PROBE_TOKENS = 32
"""Prompt columns of the calibration probe: the per-token cost it ranks is dominated by the models' matrix-vector
products, which do not depend on the context, and a short prefill keeps the calibration short."""


def _calibrates(model: Any, cfg: DecodeConfig, budget: int) -> bool:
    """Whether "auto" measures for this decode: asked for "auto", R and G on one CPU device, >= 2 threads, and
    $FLYTHINKER_DECODE_CALIBRATE not 0. CUDA and two-device placements keep the fixed rule
    (docs/decode_backends.md)."""
    if cfg.concurrent != "auto" or budget < 2 or not calibrate.enabled():
        return False
    g, r = device_of(model.generator), device_of(model.reasoner)
    return g.type == "cpu" and concurrency.same_device(g, r)


def choose_backend(model: Any, input_ids: torch.Tensor, cfg: DecodeConfig,
                   time_step: calibrate.StepTimer | None = None,
                   remote: bool = True) -> tuple[str, tuple[int, int] | None, Any]:
    """(backend, cpu_threads, calibrate.Choice or None) for a decode of `input_ids` (B, T) under `cfg`.

    An explicit backend (or True / False) always wins; so does the fixed rule where calibration does not apply
    (`_calibrates`). Otherwise the fastest candidate measured on these models at this batch size, from the cache
    when fresh. time_step: the calibration's step timer (tests inject one). remote: whether the "process" backend
    (R's cache in a worker process) is a candidate; False for decodes whose caches must stay here (rows joining
    and leaving a continuous batch)."""
    name = resolve_backend(model, cfg.concurrent)  # validates the setting for this placement first
    budget = concurrency.thread_budget()
    if not model.fusion_enabled or not _calibrates(model, cfg, budget):
        return name, cfg.cpu_threads, None
    # The cost split without the attention term: the candidates (part of the cache key) then do not depend on the
    # prompt length, and the alternative splits cover what a longer context would shift.
    cands = calibrate.candidates(per_token_macs(model), budget, cfg.cpu_threads, remote=remote)
    extra = {"projection": model.projection is not None}
    key = {"machine": calibrate.machine_key(budget), "models": calibrate.model_key(
        [model.generator, model.reasoner], extra), "batch": int(input_ids.shape[0])}
    choice = calibrate.choose(key, cands, lambda steps: _probe(model, input_ids, steps),
                              time_step=time_step)
    return choice.backend, choice.cpu_threads, choice


def _probe(model: Any, input_ids: torch.Tensor, steps: int):
    """A throwaway decode of the prompt's last PROBE_TOKENS columns (unpadded, the same batch size) with room for
    `steps` steps: (step(candidate), close). It has its own caches, feeds a fixed token and draws no random
    numbers, so the real decode's outputs do not depend on it. A candidate's backend is built once; switching away
    from one closes it (`FlyThinkerStepper.set_backend`), so "threads" hands the caller's thread back before
    sequential runs on every thread, and "process" hands R's cache back."""
    ids = input_ids[:, -min(input_ids.shape[1], PROBE_TOKENS):]
    probe = FlyThinkerStepper(model, ids, torch.ones_like(ids), DecodeConfig(
        max_new_tokens=steps + 1, concurrent="sequential", eos_token_id=[]))
    g_dev = probe.g_dev
    with torch.random.fork_rng(devices=[]):  # nothing here should draw, but the real decode must not notice if so
        probe.prefill()
    token = ids[:, -1].to(g_dev)
    backends: dict[Any, Any] = {}

    def step(c: Any) -> None:
        if c not in backends:
            backends[c] = concurrency.make_backend(c.backend, g_dev, probe.r_dev, c.cpu_threads)
        probe.set_backend(backends[c])
        probe.step(token)

    def close() -> None:
        probe.close()
        for b in backends.values():
            b.close()

    return step, close


class FlyThinkerStepper:
    """The state of one FlyThinker decode: two KV caches, the growing attention mask, next positions, r_{t-1}."""

    def __init__(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cfg: DecodeConfig):
        self.model, self.cfg = model, cfg
        self.g_dev = self.device = device_of(model.generator)
        self.r_dev = device_of(model.reasoner)
        B = input_ids.shape[0]
        # Constant across steps: the fusion mask of a generated token (a response position whose predecessor is
        # real). With scope "input" it is zero, so R's per-token states would never be read: R then runs on the
        # prompt only and the steps are G's alone (`reasoner_steps`).
        ones = torch.ones(B, 1, dtype=torch.bool, device=self.g_dev)
        self.step_fusion = model.fusion_mask(ones, response_mask=ones, prev_attention=ones[:, 0])  # (B, 1)
        self.reasoner_steps = model.config.scope != "input"
        # The calibration's answer (a calibrate.Choice) once "auto" measured or read the cache, else None.
        self.choice = None
        # Whether "auto" may move R's cache into the "process" backend's worker; the continuous batcher, which
        # resizes the caches between steps, sets it False (an explicit backend "process" is refused there).
        self.remote_ok = True
        name = resolve_backend(model, cfg.concurrent)  # checked even when there is nothing to overlap
        threads = cfg.cpu_threads
        # "auto" that measures chooses at the first step (`_choose`), the prefill running on every thread meanwhile:
        # a stepper that never steps (rows joining a server's running batch, merged into it) never measures.
        self._choose_at_step = self.reasoner_steps and _calibrates(model, cfg, concurrency.thread_budget())
        if not self.reasoner_steps or self._choose_at_step:
            name, threads = "sequential", None
        self._context = input_ids.shape[1] + cfg.max_new_tokens // 2
        self.backend = concurrency.make_backend(name, self.g_dev, self.r_dev, threads,
                                                macs=lambda: per_token_macs(model, self._context))
        self.state = PromptState(input_ids, attention_mask, cfg.max_new_tokens, self.g_dev)
        self._probe_ids = self.state.ids[:, -PROBE_TOKENS:] if self._choose_at_step else None  # (B, <= 32)
        self.mask_r = self.state.mask.to(self.r_dev)
        self.step_pos_r = self.state.step_pos.to(self.r_dev)
        self.keep_logits = {"logits_to_keep": 1} if accepts(model.generator, "logits_to_keep") else {}
        # Looked up once, not per step (nn.Module attribute access goes through __getattr__; the Reasoner's decoder
        # stack is cached by `model.reasoner_decoder`).
        self.generator = model.generator
        self.embed = self.generator.get_input_embeddings()
        self.g_kw: dict[str, Any] = {}
        self.r_cache: Any = None
        self.r_prev: torch.Tensor | None = None
        self.emb_norm: torch.Tensor | None = None
        # While the batch has no padding at all, the steps pass no attention mask: transformers reads an all-ones
        # mask as none anyway, but only after scanning it (a reduction and, on a GPU, a host sync per model per
        # step). Tied to this PromptState: continuous batching swaps in another (with padding) when rows change.
        self._unpadded: PromptState | None = None

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """One pass of each model over the whole prompt, with every thread the decode has (`prefill_scope`: the
        "threads" backend splits the cores for the steps only). Returns G's logits of the first new token (B, V)."""
        model, s = self.model, self.state
        ids, mask = s.ids, s.mask[:, : s.T]
        self._unpadded = s if bool(mask.all()) else None
        self.g_kw = cache_kwargs(model.generator, new_cache(model.generator))  # keyword looked up once per decode
        ids_r, pos_r = ids.to(self.r_dev), s.prompt_pos.to(self.r_dev)
        self.r_cache = new_cache(model.reasoner)
        mask_r = self.mask_r[:, : s.T]
        r_call = Call(lambda: model.reason(ids_r, mask_r, position_ids=pos_r, past_key_values=self.r_cache,
                                           use_cache=True), ids_r, pos_r, mask_r)
        with self.backend.prefill_scope():
            states, self.r_cache = self.backend.prefill_side(r_call)                 # (B, T, H_R)
            # Prompt positions are "input" for scope; the fusion mask leaves each row's first real token unfused.
            zeros = torch.zeros_like(ids, dtype=torch.bool)
            embeds, _ = model.fused_embeddings(ids, mask, response_mask=zeros, reasoner_states=states)  # (B, T, H_G)
            out = model.generator(inputs_embeds=embeds, attention_mask=mask, position_ids=s.prompt_pos,
                                  **self.g_kw, use_cache=True, **self.keep_logits)
        self.r_prev = states[:, -1:]                     # (B, 1, H_R): r at the last prompt position (left padding)
        # Constant across steps: one vocabulary-wide norm, computed once instead of per step.
        self.emb_norm = model.embedding_norm() if model.config.rescale else None
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, y_t: torch.Tensor) -> torch.Tensor:
        """Algorithm 2, one step: feed token y_t (B,) to both models at once; return G's next logits (B, V).

        (Parallel) R:  r_t     <- R(x_<t, y_t)                  (B, 1) -> (B, 1, H_R), appended to R's cache
        (Parallel) G:  P_{t+1} <- G(e_<t, e(y_t) + λ·r_{t-1})    (B, 1, H_G) -> (B, V), appended to G's cache
        The calls share no data (G reads r_{t-1}, R writes r_t), so the backend may run them concurrently.
        """
        model = self.model
        if self._choose_at_step:
            self._choose(y_t.shape[0])
        unpadded = self._unpadded is self.state
        mask_g, pos_g = self.state.advance()
        cols, t = mask_g.shape[1], self.state.t
        y = y_t[:, None]                                         # (B, 1)
        if not self.reasoner_steps:  # scope "input": a generated token is never fused (step_fusion is 0)
            out = self.generator(inputs_embeds=self.embed(y), attention_mask=None if unpadded else mask_g,
                                 position_ids=pos_g, **self.g_kw, use_cache=True)
            return out.logits[:, -1].float()                                                # (B, V)
        y_r = y.to(self.r_dev, non_blocking=True)
        mask_r, pos_r = (None if unpadded else self.mask_r[:, :cols]), self.step_pos_r[:, t - 1: t]
        mask_g = None if unpadded else mask_g
        r_prev = self.r_prev

        def g_call() -> torch.Tensor:
            emb = self.embed(y)                                                             # (B, 1, H_G)
            emb = model.fuse(emb, r_prev, self.step_fusion, emb_norm=self.emb_norm)         # e(y_t) + λ·r_{t-1}
            out = self.generator(inputs_embeds=emb, attention_mask=mask_g, position_ids=pos_g,
                                 **self.g_kw, use_cache=True)
            return out.logits[:, -1].float()                                                # (B, V)

        if self.backend.remote:  # the Reasoner steps in the worker process (concurrency.Processes)
            session = self.backend.session
            if not session.holds:  # its first step: R's cache, mask and positions move there
                base, kw = model.reasoner_decoder()
                session.adopt(base, kw, self.r_cache, self.mask_r, self.step_pos_r, r_prev.shape[-1],
                              r_prev.dtype, self.backend.n_r)
                self.r_cache = None
            self.r_prev, logits = self.backend.step_remote(y_r, t, cols, unpadded, g_call)
            return logits
        inputs = (y_r, pos_r) if mask_r is None else (y_r, mask_r, pos_r)
        r_call = Call(lambda: model.reason(y_r, mask_r, position_ids=pos_r, past_key_values=self.r_cache,
                                           use_cache=True)[0], *inputs)                     # (B, 1, H_R)
        self.r_prev, logits = self.backend.step(r_call, g_call)
        return logits

    def _choose(self, batch: int) -> None:
        """Replace the prefill's placeholder backend with the one "auto" measures (or finds cached) for this many
        rows (a running batch may have grown since the prefill: the probe repeats the prompt's rows to match)."""
        self._choose_at_step = False
        ids = self._probe_ids
        if ids.shape[0] != batch:
            ids = ids[torch.arange(batch, device=ids.device) % ids.shape[0]]
        name, threads, self.choice = choose_backend(self.model, ids, self.cfg, remote=self.remote_ok)
        self.set_backend(concurrency.make_backend(name, self.g_dev, self.r_dev, threads,
                                                  macs=lambda: per_token_macs(self.model, self._context)))

    def set_backend(self, backend: Any) -> None:
        """Step with `backend` from now on; a "process" backend's worker first hands R's cache back."""
        old = self.backend
        if old is backend:
            return
        if old.remote and old.session.holds:
            self.r_cache = old.session.release()
        old.close()
        self.backend = backend

    def close(self) -> None:
        self.backend.close()


__all__ = ["FlyThinkerStepper", "choose_backend", "per_token_macs", "resolve_backend", "split_threads"]
