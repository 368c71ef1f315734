"""API keys and who may do what.

Owns: key generation (a random 32-byte token), hashing (sha256: keys are random, so a slow hash adds nothing; only
hashes are stored), the admin key (FLYTHINKER_ADMIN_KEY, else generated at first start and printed once), turning
an `Authorization: Bearer KEY` header into a `Principal`, and the access rules: the admin manages users and may act
for any of them; a user key reads, writes and generates for its own user only (403 for any other user id, whether
or not it exists, so a key cannot probe which users exist).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from .db import Database
from .errors import ApiError

ADMIN_ENV = "FLYTHINKER_ADMIN_KEY"
ADMIN = "admin"
USER_PREFIX = "ftu_"
ADMIN_PREFIX = "fta_"


def new_key(prefix: str = USER_PREFIX) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def ensure_admin_key(db: Database, env_key: str | None = None) -> str | None:
    """Make sure the database holds an admin key hash. `env_key` (default $FLYTHINKER_ADMIN_KEY) replaces the
    stored one; without it a key is generated only when none is stored. Returns the generated key, which the
    caller prints once (it is not recoverable), or None."""
    env_key = os.environ.get(ADMIN_ENV) if env_key is None else env_key
    if env_key:
        if len(env_key) < 16:
            raise ValueError(f"{ADMIN_ENV} must be at least 16 characters")
        db.set_server_key(ADMIN, hash_key(env_key), replace=True)
        return None
    if db.server_key(ADMIN) is not None:
        return None
    key = new_key(ADMIN_PREFIX)
    # Two servers starting at once on one database: only the one whose insert wins prints its key.
    return key if db.set_server_key(ADMIN, hash_key(key), replace=False) else None


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the admin, or one user."""

    admin: bool
    user_id: str | None = None

    def check_user(self, user_id: str) -> None:
        """403 unless this principal may act for `user_id`."""
        if not self.admin and self.user_id != user_id:
            raise ApiError(403, "this API key may only access its own user", "permission_error", param="user_id")

    def check_admin(self) -> None:
        if not self.admin:
            raise ApiError(403, "this operation needs the admin key", "permission_error")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "authentication_error", headers={"WWW-Authenticate": "Bearer"})


def bearer_key(header: str | None) -> str:
    if not header:
        raise _unauthorized("missing API key: send 'Authorization: Bearer KEY'")
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("malformed Authorization header: expected 'Bearer KEY'")
    return key


def authenticate(db: Database, header: str | None) -> Principal:
    """The principal an Authorization header names; 401 for a missing, malformed or unknown key."""
    key = bearer_key(header)
    h = hash_key(key)
    admin = db.server_key(ADMIN)
    if admin is not None and hmac.compare_digest(admin, h):
        return Principal(admin=True)
    found = db.user_for_key_hash(h)  # looked up by hash: the hash of a random key gives nothing away
    if found is not None and hmac.compare_digest(found[1], h):
        return Principal(admin=False, user_id=found[0])
    raise _unauthorized("invalid API key")


__all__ = ["ADMIN_ENV", "Principal", "authenticate", "bearer_key", "ensure_admin_key", "hash_key", "new_key"]
