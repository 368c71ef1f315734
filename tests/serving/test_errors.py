"""Every error path answers `{"error": {"message", "type"}}` with its status code, the message naming the field or
bound at fault, and never a traceback (table-driven)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from flythinker.serving.app import create_app
from flythinker.serving.config import Limits

from .conftest import ADMIN, make_service

LIMITS = Limits(max_body_bytes=4096, max_item_chars=100, max_title_chars=20, max_meta_bytes=200,
                max_input_chars=200, max_new_tokens=64, max_items_per_user=2)


@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory):
    svc = make_service(tiny, f"sqlite:///{tmp_path_factory.mktemp('errors') / 'db.sqlite'}", limits=LIMITS)
    with TestClient(create_app(svc), raise_server_exceptions=False) as c:
        key = c.post("/v1/users", json={"user_id": "alice"}, headers=ADMIN).json()["api_key"]
        alice = {"Authorization": f"Bearer {key}"}
        first = c.post("/v1/users/alice/items", json={"text": "one"}, headers=alice).json()["item_id"]
        c.post("/v1/users/alice/items", json={"text": "two"}, headers=alice)  # alice is at the 2-item limit
        yield c, {"admin": ADMIN, "alice": alice, "none": {}, "bad": {"Authorization": "Bearer nope"},
                  "malformed": {"Authorization": "Token abc"}}, first
    svc.db.close()


GEN = {"user_id": "alice", "input": "write a review"}
CHAT = {"user": "alice", "messages": [{"role": "user", "content": "write a review"}]}
RAW = "raw:"  # a body given as raw text (invalid JSON, NaN, lone surrogates)

CASES = [
    # (name, method, path, key, body, status, type, message fragment)
    ("no key", "GET", "/v1/users/alice/items", "none", None, 401, "authentication_error", "missing API key"),
    ("unknown key", "GET", "/v1/users/alice/items", "bad", None, 401, "authentication_error", "invalid API key"),
    ("not a bearer header", "GET", "/v1/models", "malformed", None, 401, "authentication_error", "Bearer"),
    ("user key on admin route", "POST", "/v1/users", "alice", {"user_id": "x"}, 403, "permission_error", "admin"),
    ("unknown route", "GET", "/v1/nothing", "alice", None, 404, "not_found_error", "no route"),
    ("wrong method", "PUT", "/v1/generate", "alice", None, 405, "invalid_request_error", "not allowed"),
    ("malformed JSON", "POST", "/v1/generate", "alice", RAW + '{"user_id": ', 400, "invalid_request_error",
     "not valid JSON"),
    ("no body", "POST", "/v1/generate", "alice", None, 422, "invalid_request_error", "request body"),
    ("body not an object", "POST", "/v1/generate", "alice", [1, 2], 422, "invalid_request_error",
     "expected a JSON object"),
    ("missing field", "POST", "/v1/generate", "alice", {"user_id": "alice"}, 422, "invalid_request_error",
     "input: field required"),
    ("misspelt field", "POST", "/v1/generate", "alice", {**GEN, "temprature": 1}, 422, "invalid_request_error",
     "temprature"),
    ("negative temperature", "POST", "/v1/generate", "alice", {**GEN, "temperature": -0.5}, 422,
     "invalid_request_error", "temperature"),
    ("NaN temperature", "POST", "/v1/generate", "alice", RAW + '{"user_id": "alice", "input": "x", '
     '"temperature": NaN}', 422, "invalid_request_error", "temperature: input should be a finite number"),
    ("infinite top_p", "POST", "/v1/generate", "alice", RAW + '{"user_id": "alice", "input": "x", '
     '"top_p": Infinity}', 422, "invalid_request_error", "top_p"),
    ("top_p zero", "POST", "/v1/generate", "alice", {**GEN, "top_p": 0}, 422, "invalid_request_error", "top_p"),
    ("top_p above 1", "POST", "/v1/generate", "alice", {**GEN, "top_p": 1.5}, 422, "invalid_request_error",
     "top_p"),
    ("max_new_tokens 0", "POST", "/v1/generate", "alice", {**GEN, "max_new_tokens": 0}, 422,
     "invalid_request_error", "max_new_tokens"),
    ("max_new_tokens over the cap", "POST", "/v1/generate", "alice", {**GEN, "max_new_tokens": 65}, 422,
     "invalid_request_error", "at most 64"),
    ("max_new_tokens as text", "POST", "/v1/generate", "alice", {**GEN, "max_new_tokens": "8"}, 422,
     "invalid_request_error", "max_new_tokens"),
    ("negative seed", "POST", "/v1/generate", "alice", {**GEN, "seed": -1}, 422, "invalid_request_error", "seed"),
    ("stream not a bool", "POST", "/v1/generate", "alice", {**GEN, "stream": "yes"}, 422, "invalid_request_error",
     "stream"),
    ("input too long", "POST", "/v1/generate", "alice", {**GEN, "input": "x" * 201}, 422, "invalid_request_error",
     "input: at most 200"),
    ("blank input", "POST", "/v1/generate", "alice", {**GEN, "input": "   "}, 422, "invalid_request_error",
     "input: must not be blank"),
    ("bad user id", "POST", "/v1/generate", "admin", {**GEN, "user_id": "no spaces allowed"}, 422,
     "invalid_request_error", "user_id"),
    ("generate for a missing user", "POST", "/v1/generate", "admin", {**GEN, "user_id": "ghost"}, 404,
     "not_found_error", "no user 'ghost'"),
    ("empty item text", "POST", "/v1/users/alice/items", "alice", {"text": ""}, 422, "invalid_request_error",
     "text"),
    ("item text too long", "POST", "/v1/users/alice/items", "alice", {"text": "y" * 101}, 422,
     "invalid_request_error", "text: at most 100"),
    ("item title too long", "POST", "/v1/users/alice/items", "alice", {"text": "t", "title": "z" * 21}, 422,
     "invalid_request_error", "title: at most 20"),
    ("NUL in item text", "POST", "/v1/users/alice/items", "alice", {"text": "a\u0000b"}, 422,
     "invalid_request_error", "NUL"),
    ("lone surrogate in item text", "POST", "/v1/users/alice/items", "alice", RAW + '{"text": "a\\ud800b"}', 422,
     "invalid_request_error", "text: input should be a valid string"),
    ("unreadable date", "POST", "/v1/users/alice/items", "alice", {"text": "t", "date": "last tuesday"}, 422,
     "invalid_request_error", "date"),
    ("meta not an object", "POST", "/v1/users/alice/items", "alice", {"text": "t", "meta": [1, 2]}, 422,
     "invalid_request_error", "meta"),
    ("meta too big", "POST", "/v1/users/alice/items", "alice", {"text": "t", "meta": {"k": "v" * 300}}, 422,
     "invalid_request_error", "meta: at most 200 bytes"),
    ("NaN in meta", "POST", "/v1/users/alice/items", "alice", RAW + '{"text": "t", "meta": {"r": NaN}}', 422,
     "invalid_request_error", "NaN"),
    ("items per user limit", "POST", "/v1/users/alice/items", "alice", {"text": "three"}, 409, "limit_error",
     "the limit"),
    ("body too large", "POST", "/v1/users/alice/items", "alice", {"text": "w" * 5000}, 413, "request_too_large",
     "4096 bytes"),
    ("item id not a number", "DELETE", "/v1/users/alice/items/abc", "alice", None, 422, "invalid_request_error",
     "item_id"),
    ("missing item", "DELETE", "/v1/users/alice/items/999999", "alice", None, 404, "not_found_error",
     "no item 999999"),
    ("missing user", "DELETE", "/v1/users/ghost", "admin", None, 404, "not_found_error", "no user"),
    ("duplicate user", "POST", "/v1/users", "admin", {"user_id": "alice"}, 409, "conflict_error", "already exists"),
    ("bad user id in path", "GET", "/v1/users/bad%20id/items", "admin", None, 422, "invalid_request_error",
     "user_id"),
    ("chat: unknown model", "POST", "/v1/chat/completions", "alice", {**CHAT, "model": "gpt-4o"}, 404,
     "invalid_request_error", "not found"),
    ("chat: n > 1", "POST", "/v1/chat/completions", "alice", {**CHAT, "n": 2}, 422, "invalid_request_error",
     "n=1"),
    ("chat: no user message", "POST", "/v1/chat/completions", "alice",
     {**CHAT, "messages": [{"role": "system", "content": "be nice"}]}, 422, "invalid_request_error", "messages"),
    ("chat: no user field", "POST", "/v1/chat/completions", "alice", {"messages": CHAT["messages"]}, 422,
     "invalid_request_error", "user: field required"),
    ("chat: max_tokens over the cap", "POST", "/v1/chat/completions", "alice", {**CHAT, "max_tokens": 1000}, 422,
     "invalid_request_error", "max_tokens: must be at most 64"),
    ("chat: negative temperature", "POST", "/v1/chat/completions", "alice", {**CHAT, "temperature": -1}, 422,
     "invalid_request_error", "temperature"),
]


@pytest.mark.parametrize("name,method,path,key,body,status,kind,fragment", CASES, ids=[c[0] for c in CASES])
def test_error_paths(env, name, method, path, key, body, status, kind, fragment):
    c, keys, _ = env
    headers = dict(keys[key])
    if isinstance(body, str) and body.startswith(RAW):
        r = c.request(method, path, content=body[len(RAW):].encode(),
                      headers={**headers, "content-type": "application/json"})
    else:
        r = c.request(method, path, json=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["type"] == kind and fragment in err["message"], err
    assert "Traceback" not in r.text
    if status == 401:
        assert r.headers.get("www-authenticate") == "Bearer"


def test_enough_cases():
    assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)


def test_unexpected_failure_is_a_500_json_without_traceback(env, monkeypatch):
    c, keys, _ = env
    svc = c.app.state.service

    def boom():
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(svc.db, "list_users", boom)
    r = c.get("/v1/users", headers=keys["admin"])
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal server error (see the server log)", "type": "server_error"}}
    assert "secret internal detail" not in r.text and "Traceback" not in r.text


def test_body_limit_counts_bytes_without_content_length(env):
    c, keys, _ = env

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = c.post("/v1/users/alice/items", content=chunks(),
               headers={**keys["alice"], "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_prompt_over_the_context_is_a_400(tiny, tmp_path):
    # the tiny model has 512 positions: a 500-token request cannot fit after its prompt
    svc = make_service(tiny, f"sqlite:///{tmp_path / 'db.sqlite'}", limits=Limits(max_new_tokens=1000))
    with TestClient(create_app(svc), raise_server_exceptions=False) as c:
        c.post("/v1/users", json={"user_id": "u"}, headers=ADMIN)
        r = c.post("/v1/generate", json={"user_id": "u", "input": "hello", "max_new_tokens": 500}, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert "context of 512 tokens" in r.json()["error"]["message"]
    svc.db.close()


def test_error_bodies_are_valid_json_objects_for_every_case():
    # a guard on the table itself: bodies given as JSON must be serializable (the RAW ones are deliberately not)
    for c in CASES:
        if not (isinstance(c[4], str) and c[4].startswith(RAW)):
            json.dumps(c[4])
