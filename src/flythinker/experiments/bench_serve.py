"""`flythinker bench serve`: a bounded load test of `flythinker serve` at several client concurrencies.

Owns the whole run: it starts the server itself (`python -m flythinker.cli.serve` in a subprocess on a free port of
127.0.0.1, a SQLite file and state dir in a temp dir, its own admin key), creates a user with a few history items,
sends a couple of untimed warm-up requests, then for each concurrency level c sends `requests` streaming
`/v1/generate` calls from c client threads (httpx), each thread taking the next request as soon as its previous one
ends. Per level: completion tokens/s over the level's wall time, requests/s, p50/p95 latency and time to first token
(the first streamed text event), mean prompt and completion tokens; then the throughput ratio of the last level to
the first (8 clients over 1 by default). The server runs in its own process so the client threads do not share its
interpreter (GIL); on a small machine they still share its cores, which the printed load average helps judge.
Measured figures belong in docs/serving.md.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils import UserError

ITEMS = [
    ("Warm and honest", "I loved this album: warm melodies, honest lyrics and clear vocals. I would recommend it."),
    ("Too long", "The record drags in the middle; two songs could go, but the opening track is great."),
    ("A fine live set", "Overall the sound is great and the band plays tight; the crowd noise is a bit loud."),
    ("Not for me", "The production is polished, yet the songs all sound the same after a while."),
    ("Back to form", "After two weak albums this one is a return to form, with memorable hooks."),
]
REQUESTS = ["Write a review of the new album.", "Write a short review of this record.",
            "Describe what you think of the songs.", "Write a review of the band's live album.",
            "Review the latest release for a music blog."]


@dataclass
class ServeBenchConfig:
    """`flythinker bench serve` settings."""

    model: str = "tiny"
    """tiny: the random test-sized FlyThinker (saved to the temp dir and served as a checkpoint); default: the
    untrained embedded SmolLM2 Generator + its first layers as the Reasoner; or a FlyThinker checkpoint directory."""
    clients: list[int] = field(default_factory=lambda: [1, 8])
    """Concurrency levels, run in this order (comma-separated on the command line); the ratio is last / first."""
    requests: int = 16
    """Timed requests per concurrency level."""
    max_new_tokens: int = 32
    """max_new_tokens of every request (greedy decoding; a request may stop earlier at EOS)."""
    items: int = 3
    """History items of the benchmark user (what retrieval picks from for each prompt)."""
    warmup: int = 2
    """Untimed requests before the first level (first-call costs: allocation, kernels, tokenizer caches)."""
    batching: str = "continuous"
    """The server's batching mode: continuous or wave."""
    batch_wait_ms: float = 5.0
    """The server's batching window (--batch_wait_ms)."""
    threads: int = 0
    """CPU threads of the server's model (FLYTHINKER_THREADS); 0: every core it may use."""
    startup_timeout_s: float = 600.0
    """How long to wait for the server to answer /health (the default model converts its GGUF on first use)."""
    request_timeout_s: float = 600.0
    """Client-side limit on one request (the server's own limit is set just above it)."""

    def __post_init__(self) -> None:
        if not self.model or not str(self.model).strip():
            raise UserError("--model must be tiny, default or a checkpoint directory")
        if self.model not in ("tiny", "default"):
            p = Path(self.model).expanduser()
            if not (p / "flythinker.json").is_file():
                raise UserError(f"--model {self.model}: expected tiny, default or a FlyThinker checkpoint directory "
                                f"(no flythinker.json there)")
        if not self.clients or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.clients):
            raise UserError(f"--clients must be positive integers (e.g. 1,8); got {self.clients}")
        if isinstance(self.requests, bool) or self.requests < 1:
            raise UserError(f"--requests must be >= 1; got {self.requests}")
        if not 1 <= self.max_new_tokens <= 4096:
            raise UserError(f"--max_new_tokens must be in 1..4096; got {self.max_new_tokens}")
        if not 0 <= self.items <= len(ITEMS) * 20:
            raise UserError(f"--items must be in 0..{len(ITEMS) * 20}; got {self.items}")
        if self.warmup < 0 or self.threads < 0:
            raise UserError("--warmup and --threads must be >= 0")
        if self.batching not in ("continuous", "wave"):
            raise UserError(f"--batching must be continuous or wave; got {self.batching!r}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise UserError(f"--batch_wait_ms must be in [0, 10000]; got {self.batch_wait_ms}")
        if self.startup_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise UserError("--startup_timeout_s and --request_timeout_s must be > 0")


# ----------------------------------------------------------------------------------------------------------------
# the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path, seed: int = 1, scale: float = 0.3) -> Path:
    """Save the test-sized FlyThinker (weights scaled up so greedy text varies instead of repeating one token)."""
    import torch

    from ..methods.flythinker.model import FlyThinker
    from ..testing import tiny_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    g, r = tiny_lm("llama", seed=seed), tiny_lm("llama", seed=seed + 1, num_layers=1)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for lm in (g, r):
            for p in lm.parameters():
                if p.dim() == 2:
                    p.normal_(0, scale, generator=gen)
    FlyThinker(g, r, tokenizer=tok).save_pretrained(path)
    return path


class Server:
    """`flythinker serve` in a subprocess on 127.0.0.1:<free port>, over SQLite in `workdir`; a context manager."""

    def __init__(self, cfg: ServeBenchConfig, workdir: Path):
        self.cfg, self.workdir = cfg, workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin_key = "ftbench-" + secrets.token_hex(16)
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cfg = self.cfg
        if cfg.model == "tiny":
            model = ["--checkpoint", str(tiny_checkpoint(self.workdir / "tiny"))]
        elif cfg.model == "default":
            model = ["--model.generator", "default", "--model.reasoner", "default"]
        else:
            model = ["--checkpoint", str(Path(cfg.model).expanduser())]
        return [sys.executable, "-m", "flythinker.cli.serve", *model,
                "--db", f"sqlite:///{self.workdir / 'bench.db'}", "--host", "127.0.0.1", "--port", str(self.port),
                "--name", "bench", "--log_level", "warning", "--batching", cfg.batching,
                "--batch_wait_ms", str(cfg.batch_wait_ms),
                "--decode.max_new_tokens", str(cfg.max_new_tokens), "--decode.batch_size", str(max(cfg.clients)),
                "--limits.max_new_tokens", str(max(cfg.max_new_tokens, 1024)),
                "--limits.max_queue", str(max(64, 2 * max(cfg.clients))),
                "--limits.request_timeout_s", str(cfg.request_timeout_s + 60)]

    def __enter__(self):  # -> Server
        import httpx

        env = dict(os.environ, FLYTHINKER_ADMIN_KEY=self.admin_key, FLYTHINKER_STATE=str(self.workdir / "state"))
        if self.cfg.threads:
            env["FLYTHINKER_THREADS"] = str(self.cfg.threads)
        cmd = self.command()
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise UserError(f"the server exited with status {self.proc.returncode} before answering:\n"
                                f"{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise UserError(f"the server did not answer /health within {self.cfg.startup_timeout_s:.0f} s:\n"
                                f"{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if getattr(self, "log", None) is not None:
            self.log.close()


# ----------------------------------------------------------------------------------------------------------------
# the clients


@dataclass
class Result:
    ok: bool
    latency_s: float = 0.0
    ttft_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


def one_request(client: Any, headers: dict[str, str], user_id: str, text: str, max_new: int) -> Result:
    """One streaming /v1/generate; TTFT is the first event carrying text (or the final event when none does)."""
    body = {"user_id": user_id, "input": text, "max_new_tokens": max_new, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = None
    final: dict[str, Any] | None = None
    try:
        with client.stream("POST", "/v1/generate", json=body, headers=headers) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    break
                if first is not None and '"usage"' not in payload and '"error"' not in payload:
                    continue  # a later text delta: nothing to measure (keeps the client's CPU share small)
                ev = json.loads(payload)
                if "error" in ev:
                    return Result(False, error=str(ev["error"].get("message", ev["error"]))[:200])
                if first is None and ev.get("text"):
                    first = time.perf_counter()
                if "usage" in ev:
                    final = ev
    except Exception as e:  # noqa: BLE001 -- a failed request is counted, not fatal
        return Result(False, error=f"{type(e).__name__}: {e}"[:200])
    end = time.perf_counter()
    if final is None:
        return Result(False, error="the stream ended without its final event")
    usage = final["usage"]
    return Result(True, end - t0, (first or end) - t0, int(usage["prompt_tokens"]), int(usage["completion_tokens"]))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_level(base: str, headers: dict[str, str], user_id: str, clients: int, n: int, max_new: int,
              timeout_s: float) -> dict[str, Any]:
    """n requests from `clients` threads; the level's summary."""
    import httpx

    results: list[Result] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=timeout_s) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                res = one_request(client, headers, user_id, f"{REQUESTS[i % len(REQUESTS)]} (request {i})",
                                  max_new)
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=worker, name=f"bench-client-{k}") for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out: dict[str, Any] = {"clients": clients, "requests": n, "ok": len(ok), "errors": len(results) - len(ok),
                           "wall_s": round(wall, 3)}
    if ok:
        tokens = sum(r.completion_tokens for r in ok)
        out.update({
            "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 3),
            "requests_per_s": round(len(ok) / wall, 3),
            "latency_p50_s": round(percentile([r.latency_s for r in ok], 50), 3),
            "latency_p95_s": round(percentile([r.latency_s for r in ok], 95), 3),
            "ttft_p50_s": round(percentile([r.ttft_s for r in ok], 50), 3),
            "ttft_p95_s": round(percentile([r.ttft_s for r in ok], 95), 3),
            "mean_prompt_tokens": round(sum(r.prompt_tokens for r in ok) / len(ok), 1),
            "mean_completion_tokens": round(tokens / len(ok), 1),
        })
    if len(ok) < len(results):
        out["first_error"] = next(r.error for r in results if not r.ok)
    return out


def _table(levels: list[dict[str, Any]]) -> str:
    head = (f"{'clients':>7} {'ok':>5} {'tok/s':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'ttft50':>7} "
            f"{'ttft95':>7} {'prompt':>7} {'compl':>6}")
    lines = [head]
    for lv in levels:
        if not lv["ok"]:
            lines.append(f"{lv['clients']:>7} {0:>5}  all failed: {lv.get('first_error', '')}")
            continue
        lines.append(f"{lv['clients']:>7} {lv['ok']:>5} {lv['tokens_per_s']:>8.2f} {lv['requests_per_s']:>7.3f} "
                     f"{lv['latency_p50_s']:>7.2f} {lv['latency_p95_s']:>7.2f} {lv['ttft_p50_s']:>7.2f} "
                     f"{lv['ttft_p95_s']:>7.2f} {lv['mean_prompt_tokens']:>7.1f} {lv['mean_completion_tokens']:>6.1f}")
    return "\n".join(lines)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Run the load test, print the table, return the summary (the CLI prints it as the final JSON line)."""
    import httpx

    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flythinker-bench-serve-") as tmp, Server(cfg, Path(tmp)) as server:
        admin = {"Authorization": f"Bearer {server.admin_key}"}
        with httpx.Client(base_url=server.base, timeout=cfg.request_timeout_s) as c:
            r = c.post("/v1/users", json={"user_id": "bench"}, headers=admin)
            if r.status_code != 201:
                raise UserError(f"creating the benchmark user failed: HTTP {r.status_code} {r.text[:200]}")
            user = {"Authorization": f"Bearer {r.json()['api_key']}"}
            for i in range(cfg.items):
                title, text = ITEMS[i % len(ITEMS)]
                r = c.post("/v1/users/bench/items", headers=user,
                           json={"title": title, "text": text, "date": f"2024-{1 + i % 12:02d}-01",
                                 "meta": {"overall": 1 + i % 5}})
                if r.status_code != 201:
                    raise UserError(f"adding an item failed: HTTP {r.status_code} {r.text[:200]}")
            for i in range(cfg.warmup):
                res = one_request(c, user, "bench", f"{REQUESTS[i % len(REQUESTS)]} (warm-up {i})",
                                  cfg.max_new_tokens)
                if not res.ok:
                    raise UserError(f"the warm-up request failed: {res.error}\n{server.log_tail()}")
        levels = []
        for clients in cfg.clients:
            lv = run_level(server.base, user, "bench", clients, cfg.requests, cfg.max_new_tokens,
                           cfg.request_timeout_s)
            print(f"  {clients} client(s): {lv['ok']}/{lv['requests']} ok in {lv['wall_s']:.1f} s", file=sys.stderr,
                  flush=True)
            levels.append(lv)
    load_after = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    first, last = levels[0], levels[-1]
    ratio = None
    if first.get("tokens_per_s") and last.get("tokens_per_s"):
        ratio = round(last["tokens_per_s"] / first["tokens_per_s"], 3)
    out = {"bench": "serve", "model": cfg.model, "batching": cfg.batching, "max_new_tokens": cfg.max_new_tokens,
           "requests_per_level": cfg.requests, "items": cfg.items, "cores": _cores(),
           "threads": cfg.threads or _cores(), "levels": levels, "throughput_ratio": ratio,
           "ratio_clients": [last["clients"], first["clients"]], "errors": sum(lv["errors"] for lv in levels),
           "load_avg_before": load_before, "load_avg_after": load_after,
           "total_s": round(time.perf_counter() - started, 1)}
    print(f"flythinker bench serve: model {cfg.model}, batching {cfg.batching}, max_new_tokens {cfg.max_new_tokens}, "
          f"{cfg.requests} requests per level, {_cores()} cores, load average before "
          f"{'/'.join(f'{x:.2f}' for x in load_before) if load_before else 'n/a'}")
    print(_table(levels))
    if ratio is not None:
        print(f"throughput ratio {last['clients']} clients / {first['clients']}: {ratio:.2f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m flythinker.experiments.bench_serve ...`: the benchmark without the verb table."""
    import argparse

    from ..cli.main import print_json_line
    from ..config import add_dataclass_args, build_config

    parser = argparse.ArgumentParser(prog="flythinker bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML with the settings below (flags override it)")
    add_dataclass_args(parser, ServeBenchConfig)
    args = parser.parse_args(argv)
    try:
        print_json_line(run_serve_bench(build_config(ServeBenchConfig, args, args.config)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ServeBenchConfig", "free_port", "percentile", "run_serve_bench", "tiny_checkpoint"]

if __name__ == "__main__":
    sys.exit(main())
