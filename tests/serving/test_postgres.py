"""Several servers on one PostgreSQL database: their migrations do not race, an item written through one is in the
next prompt of the other, deletes and new users are seen at once by both, and the admin key is shared. (The
storage tests in test_db.py also run on PostgreSQL.) Skipped, saying why, when no PostgreSQL is reachable."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from flythinker.serving.app import create_app
from flythinker.serving.db import Database

from .conftest import ADMIN, make_service


def test_concurrent_migrations_on_a_fresh_database(pg_url):
    dbs = [Database(pg_url) for _ in range(4)]
    errors = []
    barrier = threading.Barrier(len(dbs))

    def migrate(db):
        barrier.wait()
        try:
            db.migrate()
        except Exception as e:  # noqa: BLE001 -- collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=migrate, args=(d,)) for d in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert {d.revision() for d in dbs} == {"0001_initial"}
    for d in dbs:
        d.close()


def test_two_servers_share_one_database(tiny, pg_url):
    one = make_service(tiny, pg_url)
    two = make_service(tiny, pg_url)
    with TestClient(create_app(one)) as a, TestClient(create_app(two)) as b:
        assert a.get("/health").json()["db"] == "postgresql" == b.get("/health").json()["db"]
        r = a.post("/v1/users", json={"user_id": "alice"}, headers=ADMIN)  # created through server one
        key = {"Authorization": f"Bearer {r.json()['api_key']}"}
        assert b.get("/v1/users/alice/items", headers=key).json() == {"items": []}  # her key works on two
        item = a.post("/v1/users/alice/items", json={"text": "Warm melodies, honest lyrics."},
                      headers=key).json()["item_id"]
        out = b.post("/v1/generate", json={"user_id": "alice", "input": "write a review", "max_new_tokens": 4},
                     headers=key).json()
        assert out["retrieved"] == [item]  # written through one, in the very next prompt of two
        assert "Warm melodies" in two.tokenizer.decode(two.prepare("alice", "write a review").prompt_ids)
        other = b.post("/v1/users/alice/items", json={"text": "Second, via two."}, headers=key).json()["item_id"]
        assert [i["item_id"] for i in a.get("/v1/users/alice/items", headers=key).json()["items"]] == [other, item]
        assert a.delete(f"/v1/users/alice/items/{other}", headers=key).status_code == 204
        assert b.post("/v1/generate", json={"user_id": "alice", "input": "write", "max_new_tokens": 2},
                      headers=key).json()["retrieved"] == [item]
        assert b.delete("/v1/users/alice", headers=ADMIN).status_code == 204
        assert a.get("/v1/users/alice/items", headers=key).status_code == 401  # her key went with her
        assert a.get("/v1/users/alice/items", headers=ADMIN).status_code == 404
    one.db.close()
    two.db.close()


def test_concurrent_item_writes_from_two_servers(tiny, pg_url):
    from flythinker.serving.config import Limits

    one = make_service(tiny, pg_url, limits=Limits(max_items_per_user=30, max_new_tokens=64))
    two = make_service(tiny, pg_url, limits=Limits(max_items_per_user=30, max_new_tokens=64))
    with TestClient(create_app(one)) as a, TestClient(create_app(two)) as b:
        a.post("/v1/users", json={"user_id": "u"}, headers=ADMIN)
        codes: list[int] = []
        lock = threading.Lock()

        def write(client, tid):
            for n in range(10):
                r = client.post("/v1/users/u/items", json={"text": f"{tid}-{n}"}, headers=ADMIN)
                with lock:
                    codes.append(r.status_code)

        threads = [threading.Thread(target=write, args=(c, t)) for t, c in enumerate([a, b, a, b])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # 40 attempts against a limit of 30, from two servers at once: exactly 30 land
        assert sorted(set(codes)) == [201, 409] and codes.count(201) == 30
        assert len(b.get("/v1/users/u/items", headers=ADMIN).json()["items"]) == 30
    one.db.close()
    two.db.close()
