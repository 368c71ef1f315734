"""The server decodes like the study: the anti-repetition settings (`decode.repetition_penalty`,
`no_repeat_ngram_size`, `min_new_tokens`, `penalty_scope`) reach both batching modes as server defaults and as
request fields, and a served greedy request equals `Predictor` (the study's decode) with the same settings, token
for token; one row's settings never reach another row; bad fields are 422s naming them; OpenAI's
frequency/presence penalties are checked and ignored. CoS (two prompts per request) is served and steers."""

from __future__ import annotations

import hashlib
import threading

import pytest
from fastapi.testclient import TestClient

from flythinker.decoding import DecodeConfig
from flythinker.serving.app import create_app

from .conftest import make_service, new_user, scaled_tiny_model

QUERY = "Write a review of the album. I loved this album because the melodies are warm."
ITEMS = ["I loved this album.", "Warm melodies and honest lyrics."]
BAN = {"no_repeat_ngram_size": 3, "penalty_scope": "response"}  # the study's decode (configs/personalize_*.yaml)
BOTH = pytest.mark.parametrize("batching", ["continuous", "wave"])


@pytest.fixture(scope="module")
def looping():
    """A tiny FlyThinker whose greedy text repeats n-grams (weights scaled less than the conftest's), so the
    anti-repetition settings change what it writes."""
    return scaled_tiny_model(scale=0.1)


@pytest.fixture(scope="module")
def looping_sft(looping):
    from flythinker import FlyThinker

    model, tok = looping
    return FlyThinker(model.generator, None, tokenizer=tok).eval(), tok


def _client(svc):
    return TestClient(create_app(svc))


def _user(c):
    uid, key = new_user(c, "alice")
    for t in ITEMS:
        assert c.post(f"/v1/users/{uid}/items", json={"text": t}, headers=key).status_code == 201
    return uid, key


def _predict(svc, uid, text, decode):
    """What the study's decode (`Predictor` with `decode`, the database as its ProfileStore) writes for the request:
    (text, the new token ids up to EOS)."""
    import torch

    from flythinker.data.schema import Example
    from flythinker.inference import Predictor
    from flythinker.serving.db import DatabaseProfiles

    p = Predictor(svc.model, svc.tokenizer, svc.data_cfg, decode, store=DatabaseProfiles(svc.db))
    digest = hashlib.sha256(f"{uid}\0{text}".encode()).hexdigest()[:16]  # the id the server gives the request
    example = Example(id=f"req-{digest}", user_id=uid, input=text, output="")
    ids, inputs = p._inputs(p.encode([example]))
    with torch.no_grad():
        row = svc.model.generate(ids, **inputs, **p._kwargs(None))[0].tolist()
    new = row[: row.index(p.eos_ids[0]) + 1] if p.eos_ids and p.eos_ids[0] in row else row
    return p.predict([example])[0], [t for t in new if t not in p.eos_ids]


def _has_repeat(ids, n=3):
    grams = [tuple(ids[i: i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


@BOTH
@pytest.mark.parametrize("kind", ["flythinker", "sft"])
def test_served_greedy_with_the_studys_3gram_ban_equals_the_predictor(looping, looping_sft, tmp_path, batching,
                                                                       kind):
    tiny = looping if kind == "flythinker" else looping_sft
    decode = DecodeConfig(max_new_tokens=24, batch_size=4, **BAN)
    svc = make_service(tiny, f"sqlite:///{tmp_path / 'db.sqlite'}", decode=decode, batching=batching)
    with _client(svc) as c:
        uid, key = _user(c)
        body = c.post("/v1/generate", json={"user_id": uid, "input": QUERY}, headers=key).json()
        text, ids = _predict(svc, uid, QUERY, decode)
        plain, plain_ids = _predict(svc, uid, QUERY, DecodeConfig(max_new_tokens=24))
    svc.db.close()
    assert body["text"] == text and body["usage"]["completion_tokens"] == len(ids) + (body["finish_reason"] == "stop")
    assert body["text"] == svc.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert _has_repeat(plain_ids) and not _has_repeat(ids) and text != plain  # the ban mattered


@BOTH
def test_request_fields_override_the_server_defaults(looping, tmp_path, batching):
    svc = make_service(looping, f"sqlite:///{tmp_path / 'db.sqlite'}", batching=batching,
                       decode=DecodeConfig(max_new_tokens=20, batch_size=4))
    with _client(svc) as c:
        uid, key = _user(c)
        plain = c.post("/v1/generate", json={"user_id": uid, "input": QUERY}, headers=key).json()["text"]
        fields = {"no_repeat_ngram_size": 2, "repetition_penalty": 1.3, "min_new_tokens": 20}
        got = c.post("/v1/generate", json={"user_id": uid, "input": QUERY, **fields}, headers=key).json()
        chat = c.post("/v1/chat/completions", headers=key, json={
            "model": "tiny", "user": uid, "messages": [{"role": "user", "content": QUERY}],
            "no_repeat_ngram_size": 2, "repetition_penalty": 1.3, "min_tokens": 20}).json()
        want, _ = _predict(svc, uid, QUERY, DecodeConfig(max_new_tokens=20, **fields))  # penalty_scope: server's
    svc.db.close()
    assert got["text"] == want != plain
    assert got["usage"]["completion_tokens"] == 20  # min_new_tokens = max: EOS held back to the end
    assert chat["choices"][0]["message"]["content"] == want


def test_openai_penalties_are_checked_and_ignored(looping, tmp_path):
    svc = make_service(looping, f"sqlite:///{tmp_path / 'db.sqlite'}")
    with _client(svc) as c:
        uid, key = _user(c)
        req = {"model": "tiny", "user": uid, "max_tokens": 10, "messages": [{"role": "user", "content": QUERY}]}
        base = c.post("/v1/chat/completions", json=req, headers=key).json()["choices"][0]["message"]["content"]
        same = c.post("/v1/chat/completions", json={**req, "frequency_penalty": 1.5, "presence_penalty": -0.5},
                      headers=key)
        bad = c.post("/v1/chat/completions", json={**req, "frequency_penalty": 2.5}, headers=key)
    svc.db.close()
    assert same.status_code == 200 and same.json()["choices"][0]["message"]["content"] == base
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "frequency_penalty"


@pytest.mark.parametrize("route,field,value", [
    ("generate", "repetition_penalty", 0), ("generate", "repetition_penalty", -1.0),
    ("generate", "repetition_penalty", "1.2"), ("generate", "repetition_penalty", True),
    ("generate", "repetition_penalty", 1e9), ("generate", "no_repeat_ngram_size", -1),
    ("generate", "no_repeat_ngram_size", 1.5), ("generate", "no_repeat_ngram_size", "3"),
    ("generate", "min_new_tokens", -2), ("generate", "min_new_tokens", 9),  # 9 > max_new_tokens 4
    ("chat", "repetition_penalty", 0.0), ("chat", "no_repeat_ngram_size", True), ("chat", "min_tokens", -1),
    ("chat", "min_tokens", 5),  # > max_tokens 4
])
def test_bad_decode_fields_are_422s_naming_them(client, route, field, value):
    uid, key = new_user(client, "alice")
    if route == "generate":
        url, body = "/v1/generate", {"user_id": uid, "input": QUERY, "max_new_tokens": 4}
    else:
        url, body = "/v1/chat/completions", {"user": uid, "max_tokens": 4,
                                             "messages": [{"role": "user", "content": QUERY}]}
    r = client.post(url, json={**body, field: value}, headers=key)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and "\n" not in err["message"]


@BOTH
def test_a_rows_settings_do_not_reach_its_batch_mates(looping_sft, tmp_path, batching):
    """Concurrent requests with and without a ban (and with the ban over their own prompt, scope all) share the
    engine; each gets exactly its solo text."""
    svc = make_service(looping_sft, f"sqlite:///{tmp_path / 'db.sqlite'}", batch_wait_ms=300, batching=batching,
                       decode=DecodeConfig(max_new_tokens=16, batch_size=4))
    settings = [None, {"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 3, "repetition_penalty": 1.5}, None]
    svc.db.create_user("u", "k" * 64)
    svc.db.add_item("u", ITEMS[0])
    prompts = [svc.prepare("u", q).prompt_ids for q in (QUERY, "Review the songs.", "Write about the lyrics.",
                                                        "Write a long review of the warm and honest album.")]
    svc.start()
    try:
        def run(i, own=True):
            s = svc.sampling(**(settings[i] if own and settings[i] else {}))
            return svc.engine.generate(prompts[i], 16, s)[0]

        out = [None] * 4
        barrier = threading.Barrier(4)

        def worker(i):
            barrier.wait()
            out[i] = run(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        together = svc.engine.stats()
        alone = [run(i) for i in range(4)]
        plain = [run(i, own=False) for i in (1, 2)]
    finally:
        svc.stop()
        svc.db.close()
    assert together["max_wave"] >= 2, together
    assert out == alone
    assert plain != [alone[1], alone[2]]  # the settings mattered


# ----------------------------------------------------------------------------------------------------------------
# CoS: two prompts per request


@pytest.fixture(scope="module")
def cos_tiny():
    from flythinker.methods.configs import CoSConfig
    from flythinker.methods.cos import CoSModel

    model, tok = scaled_tiny_model()
    return CoSModel(model.generator, CoSConfig(lam=2.0), tokenizer=tok).eval(), tok


@BOTH
def test_cos_is_served_and_steers_like_the_predictor(cos_tiny, tmp_path, batching):
    from flythinker import FlyThinker

    decode = DecodeConfig(max_new_tokens=16, batch_size=4, **BAN)
    svc = make_service(cos_tiny, f"sqlite:///{tmp_path / 'db.sqlite'}", decode=decode, batching=batching,
                       batch_wait_ms=200)
    assert svc.engine.batching == batching  # CoS's stepper is resizable: no fallback to waves
    with _client(svc) as c:
        uid, key = _user(c)
        assert svc.prepare(uid, QUERY).extra["plain"]  # the history-free prompt travels with the request
        texts = [QUERY, "Review the songs."]
        served = [None, None]

        def post(i):
            served[i] = c.post("/v1/generate", json={"user_id": uid, "input": texts[i]}, headers=key).json()

        threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        want = [_predict(svc, uid, t, decode)[0] for t in texts]
        rag = FlyThinker(svc.model.generator, None, tokenizer=svc.tokenizer).eval()
        svc.model, cos = rag, svc.model
        unsteered = _predict(svc, uid, QUERY, decode)[0]
        svc.model = cos
    svc.db.close()
    assert [s["text"] for s in served] == want
    assert want[0] != unsteered  # λ = 2 changed the text: the no-history prompt reached the decode


def test_server_defaults_reach_the_request_and_fit_its_budget(tiny, sqlite_url):
    decode = DecodeConfig(max_new_tokens=12, repetition_penalty=1.2, no_repeat_ngram_size=3, min_new_tokens=8,
                          penalty_scope="response")
    svc = make_service(tiny, sqlite_url, decode=decode)
    try:
        s = svc.sampling(max_new_tokens=12)
        assert s.kwargs() == {"do_sample": False, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3,
                              "min_new_tokens": 8, "penalty_scope": "response"}
        assert svc.sampling(no_repeat_ngram_size=0, max_new_tokens=4).min_new_tokens == 4  # default capped
        assert svc.sampling(repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0).kwargs() \
            == {"do_sample": False}  # a request may switch each off
        from flythinker.serving.errors import ApiError

        with pytest.raises(ApiError, match="min_tokens"):
            svc.sampling(min_new_tokens=5, max_new_tokens=4, min_param="min_tokens")
    finally:
        svc.db.close()
