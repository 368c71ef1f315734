"""The HTTP API without generation: users and items over HTTP, the admin key, and that one user's key can neither
read, change nor generate from another user's history."""

from __future__ import annotations

import pytest

from flythinker.serving.auth import authenticate, ensure_admin_key, hash_key
from flythinker.serving.db import Database
from flythinker.serving.errors import ApiError

from .conftest import ADMIN, new_user


def test_health_needs_no_key(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": "tiny", "db": "sqlite"}


def test_health_is_a_503_when_the_database_is_unreachable(client, service, monkeypatch):
    monkeypatch.setattr(service.db, "ping", lambda: False)
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "error", "model": "tiny", "db": "sqlite"}


def test_users_and_items_over_http(client):
    uid, key = new_user(client, "alice")
    assert uid == "alice" and key["Authorization"].startswith("Bearer ftu_")
    ids = []
    for n in range(3):
        r = client.post(f"/v1/users/{uid}/items", json={"text": f"review {n}", "title": f"t{n}",
                                                        "meta": {"overall": n}}, headers=key)
        assert r.status_code == 201, r.text
        ids.append(r.json()["item_id"])
    items = client.get(f"/v1/users/{uid}/items", headers=key).json()["items"]
    assert [i["item_id"] for i in items] == ids[::-1]  # newest first
    assert items[0]["text"] == "review 2" and items[0]["meta"] == {"overall": 2}
    r = client.delete(f"/v1/users/{uid}/items/{ids[0]}", headers=key)
    assert r.status_code == 204 and r.content == b""
    assert [i["item_id"] for i in client.get(f"/v1/users/{uid}/items", headers=key).json()["items"]] == ids[:0:-1]
    page = client.get(f"/v1/users/{uid}/items?limit=1&offset=1", headers=key).json()["items"]
    assert [i["item_id"] for i in page] == [ids[1]]  # ids[0] was deleted: [ids[2], ids[1]] remain
    assert client.get(f"/v1/users/{uid}/items?limit=0", headers=key).status_code == 422
    users = client.get("/v1/users", headers=ADMIN).json()["users"]
    assert [(u["user_id"], u["items"]) for u in users] == [("alice", 2)]
    assert client.delete(f"/v1/users/{uid}", headers=ADMIN).status_code == 204
    assert client.get(f"/v1/users/{uid}/items", headers=ADMIN).status_code == 404
    # the deleted user's key no longer works
    assert client.get(f"/v1/users/{uid}/items", headers=key).status_code == 401


def test_generated_user_ids_and_keys_are_unique(client):
    a, ka = new_user(client)
    b, kb = new_user(client)
    assert a != b and ka != kb and a.startswith("u_")
    assert client.post("/v1/users", json={"user_id": a}, headers=ADMIN).status_code == 409


def test_a_user_can_delete_itself(client):
    uid, key = new_user(client)
    assert client.delete(f"/v1/users/{uid}", headers=key).status_code == 204
    assert uid not in [u["user_id"] for u in client.get("/v1/users", headers=ADMIN).json()["users"]]


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/users/{b}/items", None),
    ("POST", "/v1/users/{b}/items", {"text": "planted by A"}),
    ("DELETE", "/v1/users/{b}/items/{item}", None),
    ("DELETE", "/v1/users/{b}", None),
    ("POST", "/v1/generate", {"user_id": "{b}", "input": "write like B"}),
    ("POST", "/v1/chat/completions", {"user": "{b}", "messages": [{"role": "user", "content": "write like B"}]}),
    ("GET", "/v1/users/nobody/items", None),          # a user that does not exist: the same 403, no probing
    ("GET", "/v1/users", None),                        # admin only
    ("POST", "/v1/users", {"user_id": "mallory"}),     # admin only
])
def test_user_a_cannot_touch_user_b(client, method, path, body):
    _, key_a = new_user(client, "alice")
    b, key_b = new_user(client, "bob")
    item = client.post(f"/v1/users/{b}/items", json={"text": "B's secret history"}, headers=key_b).json()["item_id"]

    def fill(x):
        if isinstance(x, str):
            return x.replace("{b}", b).replace("{item}", str(item))
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fill(v) for v in x]
        return x

    r = client.request(method, fill(path), json=fill(body), headers=key_a)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["type"] == "permission_error"
    # B's history is untouched and only B (or the admin) sees it
    items = client.get(f"/v1/users/{b}/items", headers=key_b).json()["items"]
    assert [i["text"] for i in items] == ["B's secret history"]
    assert client.get("/v1/users", headers=ADMIN).status_code == 200


def test_generation_for_a_uses_only_a_history(client):
    a, key_a = new_user(client, "alice")
    b, key_b = new_user(client, "bob")
    ia = client.post(f"/v1/users/{a}/items", json={"text": "A wrote this"}, headers=key_a).json()["item_id"]
    client.post(f"/v1/users/{b}/items", json={"text": "B wrote this"}, headers=key_b)
    r = client.post("/v1/generate", json={"user_id": a, "input": "write", "max_new_tokens": 2}, headers=key_a)
    assert r.status_code == 200 and r.json()["retrieved"] == [ia]


def test_admin_key_generated_once_and_env_key_replaces_it(sqlite_url):
    db = Database(sqlite_url)
    db.migrate()
    key = ensure_admin_key(db, env_key="")
    assert key and key.startswith("fta_")
    assert db.server_key("admin") == hash_key(key) and key not in str(db.server_key("admin"))
    assert ensure_admin_key(db, env_key="") is None  # a restart: the stored key stays, nothing printed
    assert authenticate(db, f"Bearer {key}").admin
    env = "an-admin-key-from-the-environment"
    assert ensure_admin_key(db, env_key=env) is None
    assert authenticate(db, f"bearer {env}").admin
    with pytest.raises(ApiError) as e:
        authenticate(db, f"Bearer {key}")  # replaced
    assert e.value.status == 401
    with pytest.raises(ValueError, match="at least 16"):
        ensure_admin_key(db, env_key="short")
    db.close()


def test_keys_are_stored_hashed_only(client, service):
    _, key = new_user(client, "carol")
    raw = key["Authorization"].split()[1]
    with service.db.engine.connect() as conn:
        dump = " ".join(str(row) for t in ("users", "server_keys")
                        for row in conn.exec_driver_sql(f"SELECT * FROM {t}").fetchall())
    assert raw not in dump and hash_key(raw) in dump


def test_models_list(client):
    _, key = new_user(client)
    r = client.get("/v1/models", headers=key)
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0,
                                                    "owned_by": "flythinker"}]}


def test_playground_page(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "flythinker playground" in r.text and '<script src="/static/app.js">' in r.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "/v1/generate" in js.text and "getReader" in js.text
    assert client.get("/static/missing.js").status_code == 404
    assert client.get("/static/..%2Fapp.py").status_code in (404, 422)
