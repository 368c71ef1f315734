"""The schedule driver the continuous-batching tests share (`tests/serving/test_continuous.py`,
`tests/decoding/test_processors.py`): it drives a `RowBatch` and a `RowSampler` through rows that join at given
steps and leave after their own number of tokens, as the server's engine does."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from flythinker.decoding.continuous import RowBatch, RowSampler


class Join(NamedTuple):
    """A row joining the batch: its name, prompt (1, T), tokens it decodes, sampling / anti-repetition settings
    (DecodeConfig fields; greedy when None) and further decode inputs (CoS: plain_input_ids / plain_attention_mask)."""

    name: str
    ids: torch.Tensor
    n: int
    settings: dict[str, Any] | None = None
    inputs: dict[str, torch.Tensor] | None = None


def run_schedule(model: Any, schedule: dict[int, list[Join]], concurrent: bool | str = "auto", room: int = 4,
                 eos_token_id: Any = ()) -> tuple[dict[str, list[int]], list[tuple[int, list[int]]]]:
    """Rows of `schedule[step]` join before that step's sampling; each leaves after its n tokens.

    Returns ({name: tokens}, shrink): shrink holds, after each leave that keeps some rows, (the cache length, the
    cache length each live row needs: prompt + its tokens fed so far), for steppers with one PromptState."""
    batch, sampler = RowBatch(model, concurrent=concurrent, room=room), RowSampler(eos_token_id=list(eos_token_id))
    live: list[Join] = []
    got: dict[str, list[int]] = {}
    shrink: list[tuple[int, list[int]]] = []
    logits, step = None, 0
    while step in schedule or live or any(k > step for k in schedule):
        for row in schedule.get(step, []):
            new = batch.add(row.ids, torch.ones_like(row.ids), room=2, **(row.inputs or {}))
            logits = new if logits is None else torch.cat([logits, new])
            live.append(row)
            got[row.name] = []
            sampler.add(row.settings or {"do_sample": False}, new.device, prompt_ids=row.ids[0])
        step += 1
        if not live:
            continue
        tokens = sampler.sample(logits)
        for row, t in zip(live, tokens.tolist()):
            got[row.name].append(t)
        keep = [i for i, row in enumerate(live) if len(got[row.name]) < row.n]
        if len(keep) < len(live):
            batch.keep(keep)
            sampler.keep(keep)
            live = [live[i] for i in keep]
            if not live:
                logits = None
                continue
            state = getattr(batch.stepper, "state", None)
            if state is not None:
                shrink.append((state.T + state.t, [r.ids.shape[1] + len(got[r.name]) - 1 for r in live]))
            tokens = tokens[keep]
        logits = batch.step(tokens)
    batch.close()
    return got, shrink
