"""The generation worker, in both batching modes: concurrent requests decode together (fewer busy periods than
requests) with the same greedy text as alone; under continuous batching a request that arrives while others decode
joins the running batch at the next step with the text it has alone (FlyThinker and SFT), rows with different
sampling settings share the batch (a seeded one drawing as it does alone), and a row that ends leaves at once;
under wave batching sampling settings split the waves. A full queue is a 429, the per-request deadline a 504, and a
cancelled row (a client that went away) stops being decoded.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from flythinker.decoding import DecodeConfig
from flythinker.serving.app import create_app
from flythinker.serving.config import Limits
from flythinker.serving.engine import Delta, Done, GenerationRequest, Sampling

from .conftest import ADMIN, make_service, new_user, sse_events

INPUTS = ["Write a review of the album.", "Write a long and detailed review of the new album with warm melodies.",
          "Review the songs.", "Write about the honest lyrics and the clear vocals of this record."]


def _app(tiny, tmp_path, **kw):
    svc = make_service(tiny, f"sqlite:///{tmp_path / 'db.sqlite'}", **kw)
    return svc, create_app(svc)


def _concurrently(fn, args):
    out = [None] * len(args)
    barrier = threading.Barrier(len(args))

    def run(i, a):
        barrier.wait()
        out[i] = fn(a)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


BOTH = pytest.mark.parametrize("batching", ["continuous", "wave"])


@BOTH
def test_concurrent_requests_share_a_wave_and_match_their_solo_text(tiny, tmp_path, batching):
    svc, app = _app(tiny, tmp_path, batch_wait_ms=400, batching=batching)
    with TestClient(app) as c:
        uid, key = new_user(c, "alice")
        for t in ("I loved this album.", "Warm melodies and honest lyrics."):
            c.post(f"/v1/users/{uid}/items", json={"text": t}, headers=key)

        def gen(text):
            r = c.post("/v1/generate", json={"user_id": uid, "input": text, "max_new_tokens": 20}, headers=key)
            assert r.status_code == 200, r.text
            return r.json()

        before = svc.engine.stats()
        together = _concurrently(gen, INPUTS)
        during = svc.engine.stats()
        alone = [gen(t) for t in INPUTS]
        after = svc.engine.stats()
    waves = during["waves"] - before["waves"]
    assert waves < len(INPUTS) and during["max_wave"] >= 2, during
    assert after["waves"] - during["waves"] == len(INPUTS)  # one at a time: one wave each
    assert len({r["usage"]["prompt_tokens"] for r in together}) > 1  # rows of different lengths (left padding)
    for t, a in zip(together, alone):
        assert t["text"] == a["text"] and t["usage"] == a["usage"]
    assert any(r["text"] for r in together)
    svc.db.close()


@BOTH
def test_engine_direct_batching_counts(tiny, tmp_path, batching):
    svc, _ = _app(tiny, tmp_path, batch_wait_ms=300, batching=batching)
    svc.start()
    try:
        prompts = [svc.tokenizer.encode(t) for t in INPUTS]
        solo = [svc.engine.generate(p, 10) for p in prompts]
        w0 = svc.engine.stats()["waves"]
        batched = _concurrently(lambda p: svc.engine.generate(p, 10), prompts)
        assert svc.engine.stats()["waves"] - w0 == 1
        assert [b[0] for b in batched] == [s[0] for s in solo]
    finally:
        svc.stop()
        svc.db.close()


SETTINGS = [Sampling(), Sampling(), Sampling(True, 0.8, 0.9), Sampling(True, 0.8, 0.9),
            Sampling(True, 0.8, 0.9, seed=3), Sampling(True, 0.8, 0.9, seed=3)]


def test_continuous_batch_mixes_sampling_settings_and_seeded_rows_draw_as_alone(tiny, tmp_path):
    svc, _ = _app(tiny, tmp_path, batch_wait_ms=300, decode=DecodeConfig(max_new_tokens=12, batch_size=8))
    svc.start()
    try:
        p = svc.tokenizer.encode(INPUTS[0])
        alone = svc.engine.generate(p, 6, SETTINGS[4])[0]
        s0 = svc.engine.stats()
        out = _concurrently(lambda s: svc.engine.generate(p, 6, s), SETTINGS)
        s1 = svc.engine.stats()
        assert s1["waves"] - s0["waves"] == 1 and s1["max_wave"] == 6, s1  # every setting in one batch
        assert out[4][0] == out[5][0] == alone
        assert out[0][0] == out[1][0]
    finally:
        svc.stop()
        svc.db.close()


def test_different_sampling_settings_decode_in_different_waves(tiny, tmp_path):
    svc, _ = _app(tiny, tmp_path, batch_wait_ms=300, batching="wave")
    svc.start()
    try:
        p = svc.tokenizer.encode(INPUTS[0])
        w0 = svc.engine.stats()["waves"]
        _concurrently(lambda s: svc.engine.generate(p, 6, s), SETTINGS)
        # greedy together, unseeded sampling together, each seeded request alone
        assert svc.engine.stats()["waves"] - w0 == 4
    finally:
        svc.stop()
        svc.db.close()


def test_full_queue_is_a_429(tiny, tmp_path):
    svc, app = _app(tiny, tmp_path, batch_wait_ms=1500, limits=Limits(max_queue=1, max_new_tokens=64))
    with TestClient(app) as c:
        uid, key = new_user(c, "alice")
        req = {"user_id": uid, "input": "hello", "max_new_tokens": 2}
        first = {}
        t = threading.Thread(target=lambda: first.update(r=c.post("/v1/generate", json=req, headers=key)))
        t.start()
        deadline = time.monotonic() + 10
        while svc.engine.stats()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/generate", json=req, headers=key)
        t.join(30)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert first["r"].status_code == 200
    svc.db.close()


def test_request_timeout_is_a_504_and_a_stream_error_event(tiny, tmp_path):
    svc, app = _app(tiny, tmp_path, batch_wait_ms=2000, limits=Limits(request_timeout_s=0.3, max_new_tokens=64))
    with TestClient(app) as c:
        uid, key = new_user(c, "alice")
        req = {"user_id": uid, "input": "hello", "max_new_tokens": 2}
        r = c.post("/v1/generate", json=req, headers=key)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["type"] == "timeout_error"
        with c.stream("POST", "/v1/generate", json={**req, "stream": True}, headers=key) as s:
            events = sse_events(s.read().decode())
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "timeout_error"
    svc.db.close()


@BOTH
def test_cancelled_rows_stop_and_a_fully_cancelled_wave_stops(tiny, tmp_path, batching):
    import queue

    svc, _ = _app(tiny, tmp_path, batch_wait_ms=200, batching=batching)
    svc.start()
    eng = svc.engine
    try:
        prompt = svc.tokenizer.encode(INPUTS[1])
        # one row alone, cancelled after 3 pieces: the wave stops at once
        got: queue.Queue = queue.Queue()
        req = GenerationRequest(prompt, 60, Sampling(), got.put)

        def sink(ev):
            got.put(ev)
            if got.qsize() >= 3:
                req.cancel()

        req.sink = sink
        s0 = eng.stats()
        eng.submit(req)
        deadline = time.monotonic() + 30
        while eng.stats()["cancelled"] == s0["cancelled"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        s1 = eng.stats()
        assert s1["cancelled"] == s0["cancelled"] + 1
        assert s1["steps"] - s0["steps"] < 20  # far fewer than the 60 it asked for
        # two rows, one cancelled: the other still decodes to the end
        keep: queue.Queue = queue.Queue()
        gone = GenerationRequest(prompt, 30, Sampling(), lambda ev: None)
        gone.cancel()
        stay = GenerationRequest(prompt, 30, Sampling(), keep.put)
        eng.submit(gone)
        eng.submit(stay)
        events = []
        while not events or not isinstance(events[-1], Done):
            events.append(keep.get(timeout=30))
        assert events[-1].completion_tokens == 30 or events[-1].finish_reason == "stop"
        assert all(isinstance(e, Delta) for e in events[:-1])
    finally:
        svc.stop()
        svc.db.close()


def test_stop_fails_waiting_requests_with_503(tiny, tmp_path):
    import queue

    svc, _ = _app(tiny, tmp_path, batch_wait_ms=5000)
    svc.start()
    got: queue.Queue = queue.Queue()
    svc.engine.submit(GenerationRequest(svc.tokenizer.encode("hi"), 4, Sampling(), got.put))
    svc.stop()
    ev = got.get(timeout=10)
    assert ev.error.status == 503
    with pytest.raises(Exception, match="not running"):
        svc.engine.submit(GenerationRequest([1, 2], 4, Sampling(), got.put))
    svc.db.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@BOTH
def test_a_client_that_disconnects_mid_stream_cancels_its_row(tiny, tmp_path, batching):
    import uvicorn

    svc, app = _app(tiny, tmp_path, batch_wait_ms=0, limits=Limits(max_new_tokens=300), batching=batching)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=base, timeout=30) as h:
            r = h.post("/v1/users", json={"user_id": "alice"}, headers=ADMIN)
            key = {"Authorization": f"Bearer {r.json()['api_key']}"}
            s0 = svc.engine.stats()
            req = {"user_id": "alice", "input": INPUTS[1], "max_new_tokens": 300, "stream": True}
            with h.stream("POST", "/v1/generate", json=req, headers=key) as s:
                assert s.status_code == 200, s.read()
                lines = s.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert "text" in first
            # the connection is closed here, long before 300 tokens
            deadline = time.monotonic() + 30
            while svc.engine.stats()["cancelled"] == s0["cancelled"] and time.monotonic() < deadline:
                time.sleep(0.02)
            s1 = svc.engine.stats()
        assert s1["cancelled"] == s0["cancelled"] + 1, s1
        assert s1["steps"] - s0["steps"] < 300
    finally:
        server.should_exit = True
        thread.join(30)
        svc.db.close()


def test_cancelled_requests_free_their_queue_places(tiny, tmp_path):
    from flythinker.serving.engine import QueueFull

    svc, _ = _app(tiny, tmp_path, batch_wait_ms=5000, limits=Limits(max_queue=2, max_new_tokens=64))
    svc.start()
    try:
        p = svc.tokenizer.encode("hi")
        waiting = [svc.engine.submit(GenerationRequest(p, 2, Sampling(), lambda ev: None)) for _ in range(2)]
        with pytest.raises(QueueFull):
            svc.engine.submit(GenerationRequest(p, 2, Sampling(), lambda ev: None))
        waiting[0].cancel()  # its client went away
        svc.engine.submit(GenerationRequest(p, 2, Sampling(), lambda ev: None))
        assert svc.engine.stats()["queued"] == 2
    finally:
        svc.stop()
        svc.db.close()


def _stream_into(engine, prompt, n, sampling=None):
    """Submit; return (request, queue of its events)."""
    import queue

    got: queue.Queue = queue.Queue()
    req = engine.submit(GenerationRequest(list(prompt), n, sampling or Sampling(), got.put))
    return req, got


def _text_of(got):
    pieces = []
    while True:
        ev = got.get(timeout=60)
        if isinstance(ev, Done):
            return "".join(pieces), ev
        assert isinstance(ev, Delta), ev
        pieces.append(ev.text)


@pytest.mark.parametrize("kind", ["tiny", "tiny_sft"])
def test_requests_joining_a_running_batch_get_their_solo_text(kind, tmp_path, request):
    model = request.getfixturevalue(kind)
    svc, _ = _app(model, tmp_path, batch_wait_ms=0, limits=Limits(max_new_tokens=200))
    eng = svc.engine
    svc.start()
    try:
        tok = svc.tokenizer
        long_p, *others = [tok.encode(t) for t in INPUTS]
        solo_long = eng.generate(long_p, 150)
        assert solo_long[1].completion_tokens == 150  # no early EOS: it is still running when the others arrive
        solo = [eng.generate(p, n) for p, n in zip(others, (12, 30, 5))]
        s0 = eng.stats()
        _, got = _stream_into(eng, long_p, 150)
        first = got.get(timeout=60)  # the long row is decoding: the next ones must join it mid-flight
        assert isinstance(first, Delta)
        joined = [_stream_into(eng, p, n) for p, n in zip(others, (12, 30, 5))]
        texts = [_text_of(g) for _, g in joined]
        rest = _text_of(got)
        s1 = eng.stats()
        assert s1["waves"] - s0["waves"] == 1, s1            # one busy period: nobody waited for the long row
        assert s1["joins"] - s0["joins"] == 3 and s1["max_wave"] >= 2, s1
        assert first.text + rest[0] == solo_long[0] and rest[1] == solo_long[1]
        for (text, done), alone in zip(texts, solo):
            assert text == alone[0] and done == alone[1]
        deadline = time.monotonic() + 10
        while eng.stats()["active"] and time.monotonic() < deadline:  # Done is sent just before the row leaves
            time.sleep(0.01)
        assert eng.stats()["active"] == 0
    finally:
        svc.stop()
        svc.db.close()


def test_an_ended_row_leaves_and_a_waiting_request_takes_its_place(tiny, tmp_path):
    svc, _ = _app(tiny, tmp_path, batch_wait_ms=200, decode=DecodeConfig(max_new_tokens=12, batch_size=2))
    eng = svc.engine
    svc.start()
    try:
        p = svc.tokenizer.encode(INPUTS[1])
        s0 = eng.stats()
        long_req, long_got = _stream_into(eng, p, 80)
        short = [_stream_into(eng, p, 3) for _ in range(3)]
        for _, g in short:  # the batch holds 2 rows: each short one ends, and the next takes its row
            assert _text_of(g)[1].completion_tokens <= 3
        assert not long_req.cancelled.is_set()
        done = _text_of(long_got)[1]
        assert done.completion_tokens == 80 or done.finish_reason == "stop"
        s1 = eng.stats()
        assert s1["waves"] - s0["waves"] == 1 and s1["joins"] - s0["joins"] == 2, s1
        assert s1["max_wave"] == 2
        # the short ones were served while the long one ran: far fewer steps than in waves (80 + 3 + ...)
        assert s1["steps"] - s0["steps"] <= 81
    finally:
        svc.stop()
        svc.db.close()


def test_models_without_row_surgery_fall_back_to_waves(tiny, tmp_path, monkeypatch, caplog):
    from flythinker.decoding import continuous

    monkeypatch.setattr(continuous, "unsupported_reason", lambda model: "a test says so")
    svc, _ = _app(tiny, tmp_path)
    assert svc.engine.batching == "wave" and svc.engine.stats()["batching"] == "wave"
    assert "a test says so" in caplog.text
    svc.start()
    try:
        p = svc.tokenizer.encode(INPUTS[0])
        assert svc.engine.generate(p, 4)[1].completion_tokens <= 4
    finally:
        svc.stop()
        svc.db.close()


def test_a_failing_step_fails_its_rows_with_500_and_the_engine_recovers(tiny, tmp_path, monkeypatch):
    from flythinker.decoding.continuous import RowBatch
    from flythinker.serving.errors import ApiError

    svc, _ = _app(tiny, tmp_path, batch_wait_ms=0)
    svc.start()
    try:
        p = svc.tokenizer.encode(INPUTS[0])
        real = RowBatch.step
        monkeypatch.setattr(RowBatch, "step", lambda self, tokens: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(ApiError) as e:
            svc.engine.generate(p, 5)
        assert e.value.status == 500 and svc.engine.stats()["errors"] == 1
        monkeypatch.setattr(RowBatch, "step", real)
        assert svc.engine.generate(p, 5)[1].completion_tokens >= 1
    finally:
        svc.stop()
        svc.db.close()


def test_a_row_past_its_deadline_leaves_with_504_and_its_batch_mates_continue(tiny, tmp_path):
    import queue

    from flythinker.serving.engine import Failed

    svc, _ = _app(tiny, tmp_path, batch_wait_ms=100, limits=Limits(max_new_tokens=300))
    eng = svc.engine
    svc.start()
    try:
        p = svc.tokenizer.encode(INPUTS[1])
        alone = eng.generate(p, 120)
        got_late: queue.Queue = queue.Queue()
        late = GenerationRequest(p, 280, Sampling(), got_late.put, deadline=time.monotonic() + 0.3)
        s0 = eng.stats()
        eng.submit(late)
        _, got = _stream_into(eng, p, 120)
        events = []
        while not events or not isinstance(events[-1], (Done, Failed)):
            events.append(got_late.get(timeout=60))
        assert isinstance(events[-1], Failed) and events[-1].error.status == 504
        assert _text_of(got) == alone  # the row beside it is unaffected
        assert eng.stats()["timeouts"] == s0["timeouts"] + 1
    finally:
        svc.stop()
        svc.db.close()


def test_the_queue_fills_only_once_the_running_batch_is_full(tiny, tmp_path):
    from flythinker.serving.engine import QueueFull

    svc, _ = _app(tiny, tmp_path, batch_wait_ms=0, decode=DecodeConfig(max_new_tokens=12, batch_size=2),
                  limits=Limits(max_queue=1, max_new_tokens=400))
    eng = svc.engine
    svc.start()
    try:
        p = svc.tokenizer.encode(INPUTS[0])
        running = []
        for _ in range(2):  # one at a time: a queue of 1 holds one request until the worker takes it
            running.append(_stream_into(eng, p, 400))
            assert isinstance(running[-1][1].get(timeout=60), Delta)  # in the batch: the queue is empty again
        assert eng.stats()["active"] == 2 and eng.stats()["queued"] == 0
        waiting, _ = _stream_into(eng, p, 2)                    # no free row: it waits
        with pytest.raises(QueueFull):
            eng.submit(GenerationRequest(p, 2, Sampling(), lambda ev: None))
        assert eng.stats()["queue_full"] >= 1
        for req, _ in running:
            req.cancel()
        waiting.cancel()
    finally:
        svc.stop()
        svc.db.close()
