"""Where a user's history comes from: the `ProfileStore` protocol that retrieval reads profiles through.

An example may carry its profile inline (datasets on disk: `InlineProfiles`, the default), or the history may live
elsewhere and grow over time (a service's database of users' items). Either way retrieval asks the store for the
items of `example.user_id` that the example may see, newest first, and never reads a global variable.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .schema import Example


@runtime_checkable
class ProfileStore(Protocol):
    def profile(self, example: Example) -> list[dict[str, Any]]:
        """The history items `example` may draw on, newest first (each a dict with "text" and optional "title",
        "date", ...), as `load_examples` orders an inline profile."""


class InlineProfiles:
    """The profile each example carries (`example.profile`): what every dataset on disk uses."""

    def profile(self, example: Example) -> list[dict[str, Any]]:
        return list(example.profile)


class MemoryProfiles:
    """A user_id -> items store in memory (newest first); for tests and small services."""

    def __init__(self, items: dict[str, list[dict[str, Any]]] | None = None):
        self.items: dict[str, list[dict[str, Any]]] = {u: list(v) for u, v in (items or {}).items()}

    def add(self, user_id: str, item: dict[str, Any]) -> None:
        self.items.setdefault(user_id, []).insert(0, dict(item))

    def profile(self, example: Example) -> list[dict[str, Any]]:
        return list(self.items.get(example.user_id, []))


INLINE = InlineProfiles()

__all__ = ["INLINE", "InlineProfiles", "MemoryProfiles", "ProfileStore"]
