"""The methods of the comparison, as plug-ins: `METHODS` maps a name to its `Method` (see base.py for the
protocol). A new method is one file here and one line below."""

from __future__ import annotations

from .base import Method, ModelArgs
from .coconut import Coconut
from .copy import CopyLatest, CopyRetrieved
from .cos import CoS
from .cot import CoT
from .flythinker.method import FlyThinkerMethod
from .interleaved import Interleaved
from .nextquill import NextQuill
from .sft import RAG, SFT, NonPersonalized
from .trsr import TRSR

METHODS: dict[str, Method] = {m.name: m for m in (
    NonPersonalized(),
    RAG(),
    SFT(),
    FlyThinkerMethod(),
    CoT(),
    Coconut(),
    Interleaved(),
    CoS(),
    TRSR(),
    NextQuill(),
    CopyLatest(),
    CopyRetrieved(),
)}


def get_method(name: str) -> Method:
    """The registered method `name`; a UserError listing the valid names otherwise."""
    from ..utils import UserError

    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; valid: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "ModelArgs", "get_method"]
