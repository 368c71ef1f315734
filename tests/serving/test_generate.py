"""Generation over HTTP: the prompt is built from the history as it is at request time, the reported `retrieved`
ids are the items the prompt shows, streamed text adds up to the non-streamed text, the OpenAI-compatible shapes,
and UTF-8-safe deltas."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from flythinker.serving.app import create_app

from .conftest import ADMIN, data_config, make_service, new_user, sse_events

QUERY = "Write a review of the new album about warm melodies."


def _post_items(client, uid, key, texts):
    ids = []
    for t in texts:
        r = client.post(f"/v1/users/{uid}/items", json={"text": t}, headers=key)
        assert r.status_code == 201
        ids.append(r.json()["item_id"])
    return ids


def test_an_item_posted_is_used_by_the_next_generate(client, service):
    uid, key = new_user(client, "alice")
    r = client.post("/v1/generate", json={"user_id": uid, "input": QUERY, "max_new_tokens": 4}, headers=key)
    assert r.status_code == 200 and r.json()["retrieved"] == []
    p0 = r.json()["usage"]["prompt_tokens"]
    (first,) = _post_items(client, uid, key, ["I loved this album, the lyrics are honest."])
    r = client.post("/v1/generate", json={"user_id": uid, "input": QUERY, "max_new_tokens": 4}, headers=key)
    assert r.json()["retrieved"] == [first] and r.json()["usage"]["prompt_tokens"] > p0
    (second,) = _post_items(client, uid, key, ["The vocals are clear; I would recommend it."])
    body = client.post("/v1/generate", json={"user_id": uid, "input": QUERY, "max_new_tokens": 4},
                       headers=key).json()
    assert body["retrieved"] == [second, first]  # recency, k=2: newest first
    prompt = service.tokenizer.decode(service.prepare(uid, QUERY).prompt_ids)
    assert "The vocals are clear" in prompt and "the lyrics are honest" in prompt
    assert set(body) == {"text", "retrieved", "finish_reason", "usage"}
    assert body["usage"]["completion_tokens"] <= 4 and body["finish_reason"] in ("stop", "length")
    # deleted items stop being used at once
    client.delete(f"/v1/users/{uid}/items/{second}", headers=key)
    assert client.post("/v1/generate", json={"user_id": uid, "input": QUERY, "max_new_tokens": 2},
                       headers=key).json()["retrieved"] == [first]


def test_retrieved_follows_bm25_like_the_prompt(tiny, tmp_path):
    svc = make_service(tiny, f"sqlite:///{tmp_path / 'db.sqlite'}", data=data_config(retrieval="bm25", k=1))
    with TestClient(create_app(svc)) as c:
        uid, key = new_user(c, "u")
        ids = _post_items(c, uid, key, ["This commit fixes a bug in the parser.", "Warm melodies on this album.",
                                        "The cache refactor is done."])
        r = c.post("/v1/generate", json={"user_id": uid, "input": "a review of an album with warm melodies",
                                         "max_new_tokens": 2}, headers=key)
        assert r.json()["retrieved"] == [ids[1]]
        prompt = svc.tokenizer.decode(svc.prepare(uid, "a review of an album with warm melodies").prompt_ids)
        assert "Warm melodies" in prompt and "parser" not in prompt
    svc.db.close()


def test_stream_concatenates_to_the_non_streaming_text(client):
    uid, key = new_user(client, "alice")
    ids = _post_items(client, uid, key, ["I loved this album.", "Honest lyrics, warm sound."])
    req = {"user_id": uid, "input": QUERY, "max_new_tokens": 24}
    whole = client.post("/v1/generate", json=req, headers=key).json()
    assert whole["text"]  # the scaled tiny model writes something
    with client.stream("POST", "/v1/generate", json={**req, "stream": True}, headers=key) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode("utf-8"))
    assert events[-1] == "[DONE]"
    deltas = events[:-1]
    assert all(set(e) >= {"text"} for e in deltas) and len(deltas) > 2
    assert "".join(e["text"] for e in deltas) == whole["text"]
    final = deltas[-1]
    assert final["text"] == "" and final["retrieved"] == ids[::-1] and final["usage"] == whole["usage"]
    assert final["finish_reason"] == whole["finish_reason"]


def test_server_text_matches_the_library_predictor(client, service):
    """Greedy text through the server equals `Predictor.predict` with the database as its ProfileStore."""
    import hashlib

    from flythinker.data.schema import Example
    from flythinker.decoding import DecodeConfig
    from flythinker.inference import Predictor
    from flythinker.serving.db import DatabaseProfiles

    uid, key = new_user(client, "alice")
    _post_items(client, uid, key, ["I loved this album.", "Honest lyrics, warm sound."])
    text = client.post("/v1/generate", json={"user_id": uid, "input": QUERY, "max_new_tokens": 16},
                       headers=key).json()["text"]
    p = Predictor(service.model, service.tokenizer, service.data_cfg, DecodeConfig(max_new_tokens=16),
                  store=DatabaseProfiles(service.db))
    digest = hashlib.sha256(f"{uid}\0{QUERY}".encode()).hexdigest()[:16]  # the id the server gives the request
    expected = p.predict([Example(id=f"req-{digest}", user_id=uid, input=QUERY, output="")])[0]
    assert text and text.strip() == expected


def test_openai_chat_completion_shape(client):
    uid, key = new_user(client, "alice")
    (item,) = _post_items(client, uid, key, ["I loved this album."])
    req = {"model": "tiny", "user": uid, "max_tokens": 12,
           "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": "earlier turn"},
                        {"role": "assistant", "content": "ok"}, {"role": "user", "content": QUERY}],
           "presence_penalty": 0.0}  # an OpenAI field the server ignores
    r = client.post("/v1/chat/completions", json=req, headers=key)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 12
    assert body["retrieved"] == [item]
    # the last user message is the query: the same as /v1/generate with it as input
    native = client.post("/v1/generate", json={"user_id": uid, "input": QUERY, "max_new_tokens": 12},
                         headers=key).json()
    assert choice["message"]["content"] == native["text"]
    # content given as OpenAI content parts
    parts = {**req, "messages": [{"role": "user", "content": [{"type": "text", "text": QUERY}]}]}
    assert client.post("/v1/chat/completions", json=parts, headers=key).json()["choices"][0]["message"] == \
        choice["message"]


def test_openai_streaming_chunks(client):
    uid, key = new_user(client, "alice")
    _post_items(client, uid, key, ["I loved this album."])
    req = {"model": "tiny", "user": uid, "max_tokens": 16, "messages": [{"role": "user", "content": QUERY}]}
    whole = client.post("/v1/chat/completions", json=req, headers=key).json()
    with client.stream("POST", "/v1/chat/completions", headers=key,
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    last = chunks[-2]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == whole["choices"][0]["finish_reason"]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == whole["choices"][0]["message"]["content"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])


def test_sampling_with_a_seed_is_reproducible(client):
    uid, key = new_user(client, "alice")
    req = {"user_id": uid, "input": QUERY, "max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9}
    a = client.post("/v1/generate", json={**req, "seed": 7}, headers=key).json()["text"]
    b = client.post("/v1/generate", json={**req, "seed": 7}, headers=key).json()["text"]
    others = {client.post("/v1/generate", json={**req, "seed": s}, headers=key).json()["text"] for s in (1, 2, 3)}
    greedy = client.post("/v1/generate", json={**req, "temperature": 0}, headers=key).json()["text"]
    default = client.post("/v1/generate", json={"user_id": uid, "input": QUERY, "max_new_tokens": 16},
                          headers=key).json()["text"]
    assert a == b and (others - {a})
    assert greedy == default  # temperature 0 and the server's default (greedy) agree


@pytest.mark.parametrize("text", ["é", "naïve café ✓", "漢字と🎵"])
def test_deltas_never_split_a_character(tiny, text):
    from flythinker.serving.engine import Delta, Done, GenerationRequest, Sampling, _Row

    _, tok = tiny
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters span byte-level tokens
    events = []
    row = _Row(GenerationRequest([1], 99, Sampling(), events.append), tok)
    for t in ids:
        row.push(t)
    row.finish("stop")
    deltas = [e.text for e in events if isinstance(e, Delta)]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    assert isinstance(events[-1], Done) and events[-1].completion_tokens == len(ids)


def test_invalid_bytes_are_flushed_at_the_end(tiny):
    from flythinker.serving.engine import Delta, GenerationRequest, Sampling, _Row

    _, tok = tiny
    lone = tok.encode("é", add_special_tokens=False)[:1]  # half a character, never completed
    events = []
    row = _Row(GenerationRequest([1], 99, Sampling(), events.append), tok)
    for t in tok.encode("ok ", add_special_tokens=False) + lone:
        row.push(t)
    held = "".join(e.text for e in events if isinstance(e, Delta))
    row.finish("length")
    assert held == "ok " and "".join(e.text for e in events if isinstance(e, Delta)) == "ok \ufffd"


def test_generate_as_admin_for_any_user(client):
    uid, _ = new_user(client, "alice")
    r = client.post("/v1/generate", json={"user_id": uid, "input": QUERY, "max_new_tokens": 3}, headers=ADMIN)
    assert r.status_code == 200
