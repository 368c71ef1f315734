"""The synthetic demo dataset: determinism, schema, lengths, splits, and that users are distinguishable."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from flythinker.experiments.synthetic import DemoDataConfig, make_demo_dataset, user_styles, write_demo_dataset
from flythinker.experiments.synthetic.generator import lexicon

SPLITS = ("user/train", "user/dev", "temporal/train", "temporal/dev")


@pytest.fixture(scope="module")
def data():
    return make_demo_dataset(seed=0)


def test_write_is_deterministic_and_seed_dependent(tmp_path):
    a = write_demo_dataset(tmp_path / "a", seed=0)
    b = write_demo_dataset(tmp_path / "b", seed=0)
    c = write_demo_dataset(tmp_path / "c", seed=1)
    assert set(a) == set(SPLITS)
    for split in SPLITS:
        assert a[split] == tmp_path / "a" / f"{split}.jsonl"
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
    assert (tmp_path / "a" / "README.md").read_text() == (tmp_path / "b" / "README.md").read_text()
    rows = [json.loads(line) for line in a["user/train"].read_text(encoding="utf-8").splitlines()]
    assert rows == make_demo_dataset(seed=0)["user/train"]


def test_default_sizes(data):
    assert len(data["user/train"]) == 40 * 3
    assert len(data["user/dev"]) == 12 * 2
    assert len(data["temporal/dev"]) == 52
    assert len(data["temporal/train"]) == 52 * 2
    assert len({r["user_id"] for r in data["user/train"]}) == 40
    assert len({r["user_id"] for r in data["user/dev"]}) == 12


def test_schema_and_profile_order(data):
    for split in SPLITS:
        ids = Counter(r["id"] for r in data[split])
        assert max(ids.values()) == 1, f"{split}: duplicate example ids"
        for r in data[split]:
            assert set(r) == {"id", "user_id", "input", "output", "profile"}
            assert all(isinstance(r[k], str) and r[k] for k in ("id", "user_id", "input", "output"))
            assert r["input"].startswith("Write a review of ") and "out of 5" in r["input"]
            assert len(r["profile"]) >= 3
            dates = [p["date"] for p in r["profile"]]
            for p in r["profile"]:
                assert {"id", "title", "text", "date"} <= set(p)
                assert p["id"] != r["id"] and p["text"] != r["output"]
            assert dates == sorted(dates, reverse=True) and len(set(dates)) == len(dates), "newest first, no ties"


def test_profile_is_strictly_earlier(data):
    # An example's own date is not in the row; it is the date its item carries in a later example's profile
    # (temporal/dev profiles contain every earlier item of the user).
    item_dates = {p["id"]: p["date"] for r in data["temporal/dev"] for p in r["profile"]}
    checked = 0
    for split in SPLITS:
        for r in data[split]:
            if r["id"] in item_dates:
                assert all(p["date"] < item_dates[r["id"]] for p in r["profile"])
                checked += 1
    assert checked >= 100


def test_lengths_word_proxy_and_tiny_tokenizer(data, tokenizer):
    texts = [r["output"] for split in SPLITS for r in data[split]]
    texts += [p["text"] for r in data["temporal/dev"] for p in r["profile"]]
    words = [len(t.split()) for t in texts]
    assert min(words) >= 150, "every review must be >= 150 words (hence >= 150 SmolLM2 tokens)"
    assert 170 <= sorted(words)[len(words) // 2] <= 260
    assert min(len(tokenizer(t)["input_ids"]) for t in texts[:50]) >= 150


def test_user_split_is_disjoint(data):
    train = {r["user_id"] for r in data["user/train"]}
    dev = {r["user_id"] for r in data["user/dev"]}
    assert train and dev and not train & dev
    assert {r["user_id"] for r in data["temporal/dev"]} == train | dev


def test_users_are_distinguishable_by_their_signature(data):
    """A user's signature phrase shows up in their own history and targets far more often than in anyone else's."""
    styles = {s.user_id: s for s in user_styles(52, seed=0)}
    texts_by_user: dict[str, list[str]] = {}
    for r in data["temporal/dev"]:
        texts_by_user[r["user_id"]] = [r["output"]] + [p["text"] for p in r["profile"]]
    own_rates, other_rates = [], []
    for uid, style in styles.items():
        sig = style.signature
        own = texts_by_user[uid]
        others = [t for u, ts in texts_by_user.items() if u != uid for t in ts]
        own_rates.append(sum(sig in t for t in own) / len(own))
        other_rates.append(sum(sig in t for t in others) / len(others))
    mean_own, mean_other = sum(own_rates) / len(own_rates), sum(other_rates) / len(other_rates)
    assert mean_own > 0.7 and mean_other < 0.1, (mean_own, mean_other)
    # and the target itself usually carries the history's habits (what a history-reading model can exploit)
    hits = sum(styles[r["user_id"]].signature in r["output"] for r in data["user/dev"])
    assert hits >= 0.6 * len(data["user/dev"])


def test_favourite_aspects_recur(data):
    """Each user's favourite aspects are discussed in (nearly) all of their reviews, and rarely by other users."""
    styles = {s.user_id: s for s in user_styles(52, seed=0)}
    texts = {r["user_id"]: [r["output"]] + [p["text"] for p in r["profile"]] for r in data["temporal/dev"]}
    own, other = [], []
    for uid, style in styles.items():
        for aspect in style.favourite_aspects:
            key = lexicon()["aspect_labels"][aspect].lower()
            own.append(sum(key in t.lower() for t in texts[uid]) / len(texts[uid]))
            rest = [t for u, ts in texts.items() if aspect not in styles[u].favourite_aspects for t in ts]
            other.append(sum(key in t.lower() for t in rest) / len(rest))
    assert min(own) >= 0.8 and sum(other) / len(other) < 0.3, (min(own), sum(other) / len(other))


def test_config_validation():
    with pytest.raises(ValueError):
        DemoDataConfig(items_per_user=3)
    with pytest.raises(ValueError):
        DemoDataConfig(train_examples_per_user=4)
    small = make_demo_dataset(n_users_train=3, n_users_test=2, items_per_user=5, seed=7,
                              train_examples_per_user=1, test_examples_per_user=1)
    assert len(small["user/train"]) == 3 and len(small["user/dev"]) == 2 and len(small["temporal/dev"]) == 5


def test_word_lists_load_from_the_data_file_lazily_and_are_cached():
    """The vocabulary is data next to the generator: it loads, is read once and read-only, and is not read at import."""
    lex = lexicon()
    for key in ("categories", "tones", "personas", "signatures", "openings", "closings", "elaborations", "spelling"):
        assert lex[key], key
    assert lexicon() is lex
    assert set(lex["aspect_labels"]) == set(lex["universal_aspects"]) == set(lex["elaborations"])
    with pytest.raises(TypeError):
        lex["signatures"][0] = "changed"  # type: ignore[index]
    assert make_demo_dataset(seed=3, n_users_train=2, n_users_test=1) == make_demo_dataset(
        seed=3, n_users_train=2, n_users_test=1
    )
    probe = (
        "import sys\n"
        "opened = []\n"
        "sys.addaudithook(lambda e, a: e == 'open' and 'words.json' in str(a[0]) and opened.append(a[0]))\n"
        "import flythinker.experiments.synthetic\n"
        "assert not opened, opened\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
