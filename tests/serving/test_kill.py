"""No acknowledged write is lost: `flythinker serve` on a SQLite file, a burst of item POSTs from several threads,
SIGKILL in the middle of it, a restart on the same file; every item whose POST returned 201 is there, byte for byte,
and no row is half-written (each row's meta carries the sha256 of its own text)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import ADMIN, ADMIN_KEY, scaled_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, _tok = scaled_tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny-server"
    model.save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m flythinker.cli.serve` in a subprocess (the verb, before and after it is in the verb table)."""

    def __init__(self, checkpoint: Path, db_url: str, log: Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FLYTHINKER_ADMIN_KEY": ADMIN_KEY, "FLYTHINKER_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flythinker.cli.serve", "--checkpoint", str(checkpoint), "--db", db_url,
             "--port", str(self.port), "--log_level", "warning", "--data.retrieval", "recency",
             "--decode.max_new_tokens", "8"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError(f"server did not come up:\n{log.read_text()}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def _text(tid: int, n: int) -> str:
    return f"thread {tid} item {n}: " + "a review with some body text. " * (1 + n % 7) + "ünïcode ✓"


def test_kill9_during_a_burst_of_writes_loses_no_acknowledged_item(checkpoint, tmp_path):
    from flythinker.serving.db import Database

    db_url = f"sqlite:///{tmp_path / 'state' / 'flythinker.db'}"
    log = tmp_path / "server.log"
    server = Server(checkpoint, db_url, log)
    acked: dict[int, str] = {}  # item_id -> text, for every 201
    lock = threading.Lock()
    stop = threading.Event()
    try:
        r = httpx.post(f"{server.base}/v1/users", json={"user_id": "writer"}, headers=ADMIN, timeout=10)
        key = {"Authorization": f"Bearer {r.json()['api_key']}"}

        def writer(tid: int) -> None:
            with httpx.Client(base_url=server.base, headers=key, timeout=10) as h:
                n = 0
                while not stop.is_set():
                    text = _text(tid, n)
                    body = {"text": text, "title": f"t{tid}-{n}",
                            "meta": {"sha": hashlib.sha256(text.encode()).hexdigest(), "n": n}}
                    try:
                        resp = h.post("/v1/users/writer/items", json=body)
                    except httpx.HTTPError:
                        return  # the server is gone: this write was never acknowledged
                    if resp.status_code == 201:
                        with lock:
                            acked[resp.json()["item_id"]] = text
                    n += 1

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill9()  # mid-burst: the writers are still posting
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        server.stop()
    assert len(acked) >= 40, log.read_text()

    db = Database(db_url)
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    rows = {i["item_id"]: i for i in db.items("writer")}
    db.close()
    missing = sorted(set(acked) - set(rows))
    assert not missing, f"acknowledged items lost after kill -9: {missing[:10]}"
    for item_id, text in acked.items():
        assert rows[item_id]["text"] == text
    for row in rows.values():  # acknowledged or not, nothing is half-written
        assert hashlib.sha256(row["text"].encode()).hexdigest() == row["meta"]["sha"]
        assert row["title"] and row["text"].endswith("ünïcode ✓")

    # a restart on the same file serves all of it, and generation reads it
    server = Server(checkpoint, db_url, log)
    try:
        with httpx.Client(base_url=server.base, headers=ADMIN, timeout=30) as h:
            listed = h.get("/v1/users/writer/items").json()["items"]
            assert {i["item_id"] for i in listed} == set(rows)
            newest = listed[0]["item_id"]
            out = h.post("/v1/generate", json={"user_id": "writer", "input": "write one more"}).json()
            assert out["retrieved"][0] == newest
    finally:
        server.stop()
