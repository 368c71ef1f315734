"""Retrieval "both": the newest item first, then BM25's ranking of the others (the newest never twice), up to k."""

import pytest

from flythinker.config import ConfigError
from flythinker.data import DataConfig, Example
from flythinker.data.retrieval import select_profile


def _example(query="jazz guitar solo"):
    profile = [  # newest first
        {"id": "new", "text": "Baked sourdough bread this weekend."},
        {"id": "p1", "text": "A long jazz guitar solo over the bridge."},
        {"id": "p2", "text": "Cooking pasta for friends."},
        {"id": "p3", "text": "The guitar needed new strings."},
    ]
    return Example("x", "u", query, "", profile)


def _ids(items):
    return [it["id"] for it in items]


def test_both_is_newest_then_bm25_order_of_the_rest():
    e = _example()
    bm25 = _ids(select_profile(e, "generic", "bm25", k=4))
    assert bm25[:2] == ["p1", "p3"] and bm25.index("new") > 0  # the newest item is not BM25's pick
    assert _ids(select_profile(e, "generic", "both", k=3)) == ["new", "p1", "p3"]
    assert _ids(select_profile(e, "generic", "both", k=1)) == ["new"]
    assert _ids(select_profile(e, "generic", "both", k=10)) == ["new"] + [i for i in bm25 if i != "new"]


def test_both_does_not_repeat_the_newest_when_bm25_also_ranks_it_first():
    e = _example(query="sourdough bread guitar")
    assert _ids(select_profile(e, "generic", "bm25", k=1)) == ["new"]
    got = _ids(select_profile(e, "generic", "both", k=3))
    assert got == ["new"] + _ids(select_profile(e, "generic", "bm25", k=3))[1:] and len(set(got)) == 3


def test_both_edge_cases_and_config():
    e = _example()
    assert select_profile(e, "generic", "both", k=0) == []
    assert select_profile(Example("y", "u", "q", "", []), "generic", "both", k=2) == []
    assert DataConfig(retrieval="both").retrieval == "both"
    with pytest.raises(ConfigError, match="retrieval"):
        DataConfig(retrieval="bothh")
