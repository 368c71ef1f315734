"""Continuous batching at the decode level: one live decode whose rows join and leave between steps.

Owns `RowBatch` (the running batch of a server: rows are added at a step boundary and dropped at any boundary, with
every per-row tensor of the decode state, KV caches included, extended or compacted to match), the KV-cache surgery
it needs (`merge_caches`, `select_cache`) and per-row sampling (`RowSampler`: each row its own settings and, when
seeded, its own random generator, so rows with different settings share one batch; a row with a repetition penalty,
no-repeat n-grams or min new tokens runs transformers' processors on its own history, prompt + its tokens).

Why it is built on the model's own stepper: prefill and step stay the very code a solo `decoding.loop.stream` runs
(`model.decoder(...)`: `CausalLMStepper`, or FlyThinker's two-cache `FlyThinkerStepper`), so a row's text is the
same whether it decodes alone, in a wave, or joins a running batch. Joining rows are prefilled as their own small
left-padded batch by a fresh stepper; its state is then merged into the running stepper's along the batch
dimension: the shorter side's caches are left-padded along the sequence axis (with zeros in the attention mask
there), every row keeps its own position ids (RoPE never sees the padding), and FlyThinker's per-row r_{t-1} and
fusion mask are concatenated. Leaving rows are dropped with index_select on every cache tensor, and the leading
columns no remaining row attends to are cut, so the caches stay as long as the longest live row.

A stepper may hold several sub-decodes, each with its own prompt, positions and caches (CoS's `CoSStepper`: one
cache over the prompt with the user's history and one over the prompt without it, of different lengths); each is
merged and compacted on its own. Method-specific prompts reach `model.decoder` as keywords of `RowBatch.add`
(`plain_input_ids=` / `plain_attention_mask=` for CoS, the names its `generate` takes).

The steppers do not offer row surgery themselves, so `_StepperRows` knows, per stepper class, which of its
attributes hold per-row state. A model whose stepper is not one of those (or whose cache has layers other than
plain dynamic ones, e.g. sliding-window) raises `RowsUnsupported` and callers fall back to wave batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .loop import CausalLMStepper, PromptState
from .sampling import (
    NO_TOKEN,
    DecodeConfig,
    apply_processors,
    build_logits_processor,
    decode_config,
    pick_token,
    sample_next_token,
)


class RowsUnsupported(Exception):
    """This model's decode state cannot be resized row by row (use wave batching)."""


# ----------------------------------------------------------------------------------------------------------------
# KV caches: transformers' DynamicCache, as a list of layers holding keys / values (B, heads, L, head_dim)


def _layers(cache: Any) -> list[Any]:
    """The cache's layer objects; RowsUnsupported unless every one is a plain (full-attention) dynamic layer."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RowsUnsupported(f"{type(cache).__name__} has no per-layer key/value objects (transformers < 4.56?)")
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise RowsUnsupported(f"cache layer {type(layer).__name__} is not a plain DynamicLayer (sliding window, "
                                  f"quantized or linear-attention caches cannot be merged by padding)")
    return layers


def _live(layer: Any) -> bool:
    return bool(getattr(layer, "is_initialized", False)) and layer.keys is not None and layer.keys.numel() > 0


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad (B, H, L, D) with zeros to `length` along L."""
    return x if x.shape[-2] >= length else F.pad(x, (0, 0, length - x.shape[-2], 0))


def check_cache(cache: Any) -> None:
    """RowsUnsupported when `cache` cannot be merged or compacted by rows."""
    _layers(cache)


def merge_caches(into: Any, other: Any, length: int) -> None:
    """Append `other`'s rows to `into`'s, both left-padded along the sequence axis to `length` (in place on `into`)."""
    a_layers, b_layers = _layers(into), _layers(other)
    if len(a_layers) != len(b_layers):
        raise RowsUnsupported(f"caches of {len(a_layers)} and {len(b_layers)} layers cannot be merged")
    for a, b in zip(a_layers, b_layers):
        if not _live(b):
            continue
        if not _live(a):  # KV-sharing layers stay empty on both sides; anything else is a mismatch
            raise RowsUnsupported("cannot merge a cache layer that holds keys into one that does not")
        a.keys = torch.cat([_pad_seq(a.keys, length), _pad_seq(b.keys, length)], dim=0)
        a.values = torch.cat([_pad_seq(a.values, length), _pad_seq(b.values, length)], dim=0)


def select_cache(cache: Any, rows: torch.Tensor, start: int = 0) -> None:
    """Keep only `rows` (a LongTensor of batch indices) and the sequence columns from `start` on (in place)."""
    for layer in _layers(cache):
        if not _live(layer):
            continue
        idx = rows.to(layer.keys.device)
        layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
        layer.values = layer.values.index_select(0, idx)[:, :, start:]


# ----------------------------------------------------------------------------------------------------------------
# which attributes of a stepper hold per-row state


class _StepperRows:
    """Per-row state of one stepper class: its sub-decodes (`parts`: each with its own `.state`, caches and mask),
    its other (B, ...) tensors, and the caches the side stream reads. The methods read and write attributes of the
    decode loop's steppers (see the module docstring)."""

    @staticmethod
    def for_stepper(stepper: Any) -> _StepperRows:
        if type(stepper) is CausalLMStepper:
            return _CausalRows()
        from ..methods.cos import CoSStepper
        from ..methods.flythinker.decode import FlyThinkerStepper

        if type(stepper) is FlyThinkerStepper:
            return _FlyThinkerRows()
        if type(stepper) is CoSStepper:
            return _CoSRows()
        raise RowsUnsupported(f"{type(stepper).__name__} does not support rows joining and leaving")

    def parts(self, s: Any) -> list[tuple[Any, _StepperRows]]:
        """The sub-decodes of `s` that own a PromptState (`.state`) and caches, with their row operations."""
        return [(s, self)]

    def caches(self, s: Any) -> list[Any]:
        raise NotImplementedError

    def side_caches(self, s: Any) -> list[Any]:
        """The caches the cuda_streams backend's side stream reads and writes."""
        return []

    def settle(self, s: Any) -> None:
        """Refresh what `s` derives from its parts' states after surgery."""

    def tensors(self, s: Any) -> dict[str, torch.Tensor]:
        return {}

    def set_tensors(self, s: Any, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            setattr(s, k, v)

    def set_state(self, s: Any, state: PromptState) -> None:
        s.state = state


class _CausalRows(_StepperRows):
    def caches(self, s: Any) -> list[Any]:
        return list(s.cache_kw.values())


class _FlyThinkerRows(_StepperRows):
    def caches(self, s: Any) -> list[Any]:
        return [*s.g_kw.values(), s.r_cache]

    def side_caches(self, s: Any) -> list[Any]:
        return [s.r_cache]

    def tensors(self, s: Any) -> dict[str, torch.Tensor]:
        return {"r_prev": s.r_prev, "step_fusion": s.step_fusion}      # (B, 1, H_R), (B, 1)

    def set_state(self, s: Any, state: PromptState) -> None:
        s.state = state
        s.mask_r = state.mask.to(s.r_dev)
        s.step_pos_r = state.step_pos.to(s.r_dev)


class _CoSRows(_StepperRows):
    """CoS: two `CausalLMStepper`s of one model (with and without the user's history), each resized on its own."""

    def parts(self, s: Any) -> list[tuple[Any, _StepperRows]]:
        return [(s.ctx, _CausalRows()), (s.noctx, _CausalRows())]

    def caches(self, s: Any) -> list[Any]:
        return [*s.ctx.cache_kw.values(), *s.noctx.cache_kw.values()]

    def side_caches(self, s: Any) -> list[Any]:
        return list(s.noctx.cache_kw.values())

    def settle(self, s: Any) -> None:
        # the tensors a stream backend records for the history-free call (a resized state has no prompt fields)
        st = s.noctx.state
        s._side_inputs = tuple(t for t in (st.ids, st.mask, st.prompt_pos, st.step_pos) if t is not None)


def _state(mask: torch.Tensor, next_pos: torch.Tensor, room: int) -> PromptState:
    """A PromptState continuing from cached positions: `mask` (B, L) over the cache, `next_pos` (B,) the position
    of each row's next fed token, buffers for `room` more steps."""
    st = PromptState.__new__(PromptState)
    B, L = mask.shape
    st.ids = st.prompt_pos = None  # prompt-only fields, read by prefill, which has run
    st.mask = torch.ones(B, L + room, dtype=mask.dtype, device=mask.device)
    st.mask[:, :L] = mask
    st.step_pos = next_pos[:, None] + torch.arange(room, device=mask.device)                 # (B, room)
    st.T, st.t = L, 0
    return st


def _cached(state: PromptState) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mask over the cached positions (B, L), next position (B,), steps of room left) of a stepper's state."""
    L = state.T + state.t
    return state.mask[:, :L], state.step_pos[:, 0] + state.t, state.step_pos.shape[1] - state.t


def unsupported_reason(model: Any) -> str | None:
    """Why `model`'s decodes cannot run as a `RowBatch` (its stepper class, or its caches' layer kinds), or None.
    Builds one stepper over a one-token prompt (no forward pass) and empty caches."""
    from ..hf import new_cache

    if not callable(getattr(model, "decoder", None)) or not callable(getattr(model, "decode_lms", None)):
        return f"{type(model).__name__} has no decoder() / decode_lms()"
    try:
        dev = next(model.parameters()).device
        one = torch.ones(1, 1, dtype=torch.long, device=dev)
        stepper = model.decoder(one, one, DecodeConfig(max_new_tokens=1, concurrent=False))
        try:
            _StepperRows.for_stepper(stepper)
        finally:
            stepper.close()
        for _, lm in model.decode_lms():
            check_cache(new_cache(lm))
    except RowsUnsupported as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- a stepper that cannot even be built this way is not resizable either
        return f"building its stepper for a probe failed ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------------------------------------------


class RowBatch:
    """A decode batch whose rows change at step boundaries. Row order: the order rows were added, minus dropped.

        batch = RowBatch(model)
        logits = batch.add(input_ids, attention_mask)   # prefill new rows; logits (n, V) of their first token
        logits = batch.step(tokens)                     # feed one token per live row; logits (B, V)
        batch.keep([0, 2])                              # drop every other row
    Callers sample from the logits (e.g. `RowSampler`) and interleave add / step / keep as rows come and go.
    Raises RowsUnsupported (from `add`) when the model's stepper cannot be resized. The batch lives as long as its
    server, so the model is put in eval mode here and left there (`stream` restores the mode after each decode).
    """

    def __init__(self, model: Any, concurrent: bool | str = "auto", cpu_threads: tuple[int, int] | None = None,
                 room: int = 64):
        if callable(getattr(model, "eval", None)):
            model.eval()
        self.model = model
        if concurrent == "process":  # R's cache would live in the worker process, out of reach of the row surgery
            raise ValueError("decode backend 'process' cannot run a continuous batch (rows joining and leaving "
                             "resize the Reasoner's cache between steps); use threads, sequential or auto")
        self.concurrent, self.cpu_threads = concurrent, cpu_threads
        self.room = max(1, int(room))
        self.stepper: Any = None
        self.ops: _StepperRows | None = None
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    @property
    def device(self) -> torch.device:
        return self.stepper.device

    def _cfg(self, room: int) -> DecodeConfig:
        return DecodeConfig(max_new_tokens=max(1, room), concurrent=self.concurrent, cpu_threads=self.cpu_threads)

    @torch.inference_mode()
    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, room: int | None = None,
            **inputs: torch.Tensor) -> torch.Tensor:
        """Prefill a left-padded (n, T) prompt batch as new rows at the end; return their first logits (n, V).
        room: a hint of how many steps they may take (buffers grow when it runs out). inputs: further (n, T')
        prompts the model's `decoder` takes by keyword (CoS: plain_input_ids, plain_attention_mask)."""
        room = max(self.room, int(room or 0))
        new = self.model.decoder(input_ids, attention_mask, self._cfg(room), **inputs)
        if hasattr(new, "remote_ok"):
            new.remote_ok = False  # "auto" must not move a cache the row surgery resizes into a worker process
        try:
            ops = _StepperRows.for_stepper(new)
            if self.ops is not None and type(ops) is not type(self.ops):
                raise RowsUnsupported("rows of different stepper kinds cannot share a batch")
            logits = new.prefill()
            for c in ops.caches(new):
                check_cache(c)
        except BaseException:
            new.close()
            raise
        n = input_ids.shape[0]
        if self.stepper is None or self.rows == 0:
            if self.stepper is not None:
                self.stepper.close()
            self.stepper, self.ops, self.rows = new, ops, n
            return logits
        self._merge(new, n)
        return logits

    def _merge(self, new: Any, n: int) -> None:
        host, ops = self.stepper, self.ops
        for (part, part_ops), (other, _) in zip(ops.parts(host), ops.parts(new)):
            mask_a, pos_a, room_a = _cached(part.state)
            mask_b, pos_b, room_b = _cached(other.state)
            length = max(mask_a.shape[1], mask_b.shape[1])
            for a, b in zip(part_ops.caches(part), part_ops.caches(other)):
                merge_caches(a, b, length)
            mask = torch.cat([F.pad(mask_a, (length - mask_a.shape[1], 0)),
                              F.pad(mask_b.to(mask_a.device), (length - mask_b.shape[1], 0))], dim=0)
            part_ops.set_state(part, _state(mask, torch.cat([pos_a, pos_b.to(pos_a.device)]), max(room_a, room_b)))
        ops.set_tensors(host, {k: torch.cat([v, ops.tensors(new)[k].to(v.device)], dim=0)
                               for k, v in ops.tensors(host).items()})
        ops.settle(host)
        self._streams_settle(host)
        new.close()
        self.rows += n

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per live row (B,); return the logits (B, V) of each row's next position."""
        if self.rows == 0:
            raise ValueError("step() on an empty batch")
        if tokens.shape[0] != self.rows:
            raise ValueError(f"step() got {tokens.shape[0]} tokens for {self.rows} rows")
        grown = False
        for part, part_ops in self.ops.parts(self.stepper):
            st = part.state
            if st.t >= st.step_pos.shape[1]:  # out of room: fresh buffers with more
                mask, pos, _ = _cached(st)
                part_ops.set_state(part, _state(mask, pos, self.room))
                grown = True
        if grown:
            self.ops.settle(self.stepper)
        return self.stepper.step(tokens.to(self.device))

    @torch.inference_mode()
    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the rows at these indices (in this order); the others leave the batch."""
        rows = list(rows)
        if rows == list(range(self.rows)):
            return
        if not rows:
            self.close()
            return
        host, ops = self.stepper, self.ops
        for part, part_ops in ops.parts(host):
            mask, pos, room = _cached(part.state)
            idx = torch.tensor(rows, dtype=torch.long, device=mask.device)
            mask = mask.index_select(0, idx)
            # Columns no remaining row attends to (they were padding for all of them) leave the caches too.
            start = int(mask.any(0).long().argmax()) if mask.shape[1] else 0
            for c in part_ops.caches(part):
                select_cache(c, idx, start)
            part_ops.set_state(part, _state(mask[:, start:], pos.index_select(0, idx), max(room, 1)))
        ops.set_tensors(host, {k: v.index_select(0, torch.tensor(rows, dtype=torch.long, device=v.device))
                               for k, v in ops.tensors(host).items()})
        ops.settle(host)
        self._streams_settle(host)
        self.rows = len(rows)

    def _streams_settle(self, host: Any) -> None:
        """After surgery on CUDA: wait for it to finish, and mark the new Reasoner tensors as used by the side
        stream (the cuda_streams backend), so the caching allocator never recycles them while a side-stream kernel
        may still read them."""
        dev = getattr(host, "device", None)
        if dev is None or dev.type != "cuda":
            return
        side = getattr(getattr(host, "backend", None), "side", None)
        if side is not None:
            for c in self.ops.side_caches(host):
                for layer in _layers(c):
                    if _live(layer):
                        layer.keys.record_stream(side)
                        layer.values.record_stream(side)
        torch.cuda.synchronize(dev)

    def close(self) -> None:
        if self.stepper is not None:
            self.stepper.close()
        self.stepper, self.ops, self.rows = None, None, 0


# Settings whose processors read the row's tokens so far.
_HISTORY_KEYS = ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "copy_bonus")


class _History:
    """One row's running sequence (its own prompt, unpadded, then each picked token) and its logits processors."""

    def __init__(self, cfg: DecodeConfig, prompt_ids: torch.Tensor, eos_ids: Sequence[int], device: torch.device):
        prompt = prompt_ids.reshape(1, -1).to(device=device, dtype=torch.long)                   # (1, T_i)
        self.ids = prompt
        if cfg.penalty_scope == "response":  # the prompt counts for its length only (min_new_tokens)
            self.ids = torch.full_like(self.ids, NO_TOKEN)
        self.procs = build_logits_processor(cfg, eos_ids, self.ids.shape[1], device, prompt_ids=prompt)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return apply_processors(self.procs, self.ids, logits.float())                           # (1, V)

    def append(self, token: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, token.reshape(1, 1).to(self.ids)], dim=1)               # (1, T_i + t)


class RowSampler:
    """Per-row sampling: greedy rows by one argmax, rows sharing unseeded settings by one draw from the global RNG,
    and each seeded row from its own torch.Generator (so its draws do not depend on its batch-mates). A row with a
    repetition penalty, no-repeat n-grams or min new tokens also keeps its own history (its prompt and picked
    tokens) and runs its own logits processors on it, as `decoding.loop` does for a batch, so its tokens are the
    same as when it decodes alone."""

    def __init__(self, eos_token_id: int | Sequence[int] | None = None) -> None:
        """eos_token_id: the ids min_new_tokens suppresses, for rows whose settings do not name their own."""
        self.eos_token_id = eos_token_id
        self.rows: list[tuple[tuple, torch.Generator | None, _History | None]] = []

    def add(self, settings: dict[str, Any], device: torch.device, prompt_ids: Any = None) -> None:
        """settings: DecodeConfig-style do_sample / temperature / top_p / top_k / seed of one new row, and
        optionally repetition_penalty / no_repeat_ngram_size / min_new_tokens (with eos_token_id, else the
        sampler's). prompt_ids: the row's prompt (a sequence or 1-D tensor, no padding), needed by those three."""
        sampled = bool(settings.get("do_sample")) and float(settings.get("temperature", 1.0)) > 0
        key = ("greedy",) if not sampled else ("sample", float(settings.get("temperature", 1.0)),
                                               int(settings.get("top_k", 0) or 0), float(settings.get("top_p", 1.0)))
        seed = settings.get("seed")
        gen = torch.Generator(device=device).manual_seed(int(seed)) if sampled and seed is not None else None
        hist = None
        if any(k in settings for k in _HISTORY_KEYS):
            cfg = decode_config({k: v for k, v in settings.items() if k not in ("max_new_tokens", "seed")})
            if cfg.uses_history:
                if prompt_ids is None:
                    raise ValueError("RowSampler.add: repetition_penalty / no_repeat_ngram_size / min_new_tokens "
                                     "need the row's prompt_ids")
                eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.eos_token_id
                if cfg.min_new_tokens > 0 and eos is None:
                    raise ValueError("RowSampler.add: min_new_tokens needs eos_token_id (in the settings or the "
                                     "sampler)")
                eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
                hist = _History(cfg, torch.as_tensor(prompt_ids), eos_ids, device)
        self.rows.append((key, gen, hist))

    def keep(self, rows: Sequence[int]) -> None:
        self.rows = [self.rows[i] for i in rows]

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B,) next tokens (each row with a history records its own)."""
        out = logits.argmax(dim=-1)
        groups: dict[tuple, list[int]] = {}
        for i, (key, gen, hist) in enumerate(self.rows):
            if hist is not None:
                # the processors include this row's warpers, so a sampled row draws from the filtered scores
                out[i] = pick_token(hist.scores(logits[i: i + 1]), gen, key[0] == "sample")[0]
            elif key[0] == "greedy":
                continue
            elif gen is not None:
                _, temp, top_k, top_p = key
                out[i] = sample_next_token(logits[i: i + 1], gen, True, temp, top_k, top_p)[0]
            else:
                groups.setdefault(key, []).append(i)
        for (_, temp, top_k, top_p), idx in groups.items():
            sel = torch.tensor(idx, device=logits.device)
            out[sel] = sample_next_token(logits.index_select(0, sel), None, True, temp, top_k, top_p)
        for i, (_, _, hist) in enumerate(self.rows):
            if hist is not None:
                hist.append(out[i])
        return out


__all__ = ["RowBatch", "RowSampler", "RowsUnsupported", "check_cache", "merge_caches", "select_cache",
           "unsupported_reason"]
