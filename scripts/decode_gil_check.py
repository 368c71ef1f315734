"""Where the "threads" decode backend's per-device overhead comes from (docs/decode_backends.md, "The process backend").

Times one Generator step of the embedded models (512-token prompt, batch 1, one core per model) four ways, in
interleaved rounds: G alone; R then G on one thread; G with R's step on a worker thread (lock-stepped, as the engine
runs it); G with R's step in a worker process (lock-stepped through a pipe). The thread/process gap is the GIL.
Run on an idle machine: `python scripts/decode_gil_check.py` (about 1 minute on 2 cores).
"""

import multiprocessing as mp
import statistics
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch


def _load():
    from flythinker.models import load_default_models

    g, r, _ = load_default_models(reasoner_layers=None)
    return g.eval(), r.eval()


def _prefill(lm, T=512):
    from transformers import DynamicCache

    ids = torch.randint(3, 40000, (1, T), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    with torch.inference_mode():
        lm(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache, T


def _step(lm, cache, pos, base=False):
    y, p = torch.tensor([[5]]), torch.tensor([[pos]])
    with torch.inference_mode():
        if base:  # R: the decoder stack only (its head is never run)
            return lm.model(input_ids=y, position_ids=p, past_key_values=cache, use_cache=True).last_hidden_state
        return lm(input_ids=y, position_ids=p, past_key_values=cache, use_cache=True, logits_to_keep=1).logits


def _r_server(conn):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    _, r = _load()
    cache, T = _prefill(r)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        if msg == "reset":
            cache, T = _prefill(r)
            conn.send("ok")
            continue
        _step(r, cache, T + msg, base=True)
        conn.send(1)


def main(rounds=4, n=25):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    g, r = _load()
    ex = ThreadPoolExecutor(1, initializer=lambda: torch.set_num_threads(1))
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_r_server, args=(b,))
    proc.start()
    a.recv()
    res = {"G alone": [], "R then G": [], "R on a thread": [], "R in a process": []}
    for _ in range(rounds):
        for name in res:
            gc, gT = _prefill(g)
            rc, rT = _prefill(r)
            if name == "R in a process":
                a.send("reset")
                a.recv()
            for i in range(n):
                t0 = time.perf_counter()
                if name == "G alone":
                    _step(g, gc, gT + i)
                elif name == "R then G":
                    _step(r, rc, rT + i, True)
                    _step(g, gc, gT + i)
                elif name == "R on a thread":
                    f = ex.submit(_step, r, rc, rT + i, True)
                    _step(g, gc, gT + i)
                    f.result()
                else:
                    a.send(i)
                    _step(g, gc, gT + i)
                    a.recv()
                if i >= 2:  # the first steps pay allocations and wake-ups
                    res[name].append((time.perf_counter() - t0) * 1e3)
    a.send(None)
    proc.join()
    med = {k: statistics.median(v) for k, v in res.items()}
    for k, v in med.items():
        print(f"{k:<15} {v:7.2f} ms/step  {v / med['G alone']:.3f} x G alone")


if __name__ == "__main__":
    main()
