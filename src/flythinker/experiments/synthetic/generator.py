"""A small synthetic personalized long-form dataset that the project generates itself (no download, no model).

Owns: the synthetic users (each with a hidden writing style), their product reviews, and the `user` and `temporal`
splits in the generic schema `{"id", "user_id", "input", "output", "profile": [{"id", "title", "text", "date",
"rating"}, ...]}` (profile = the same user's strictly earlier reviews, newest first).

Why it exists: the demo and the tests need data that is small enough for a CPU, free to redistribute, and in which
personalization provably matters. Every user has a style that is never stated anywhere, only visible in their
history: favourite aspects (discussed first and at length), tone (enthusiastic / critical / dry / warm /
analytical), length, structure (paragraphs, one block, pros/cons bullets, headed sections, numbered points),
opening and closing habits, a recurring signature phrase, an optional sign-off, a persona whose situations recur,
British or American spelling, and favourite categories. The query only names the product, category and rating, so a
model that reads the history can predict the style and the favourite aspects and one that does not cannot. The
product-specific content (names, details, prices, polarity per aspect) changes from review to review and is drawn
from many slot-filled templates, so a history item is never a copy of the target.

Everything is pure Python and seeded (`random.Random` seeded with strings is stable across runs and platforms), so
the same seed gives byte-identical files.

This module is the logic; the vocabulary (categories, products, tones, personas, habits, sentence templates,
spelling tables) is data in `words.json` next to it, so the word lists can be read and edited without wading through
code. It is read on first use, not at import (see `lexicon`). Its order matters: every draw is over its lists and
key orders, so any edit there changes the generated datasets.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

# ----------------------------------------------------------------------------------------------------------------
# settings


@dataclass
class DemoDataConfig:
    """Sizes of the demo dataset. Defaults: 40 train users x 3 examples (120) and 12 dev users x 2 examples (24)
    in the user split; the temporal split covers all 52 users (each one's latest review -> dev)."""

    n_users_train: int = 40
    n_users_test: int = 12
    items_per_user: int = 6
    """Reviews written by each user (oldest first); the last ones become examples, the earlier ones their profile."""
    train_examples_per_user: int = 3
    test_examples_per_user: int = 2
    min_profile: int = 3
    """An example needs at least this many earlier reviews (as in the real datasets)."""
    min_words: int = 150
    """Hard lower bound on every review's length in words (>= 150 words guarantees >= 150 SmolLM2 tokens)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_users_train < 1 or self.n_users_test < 1:
            raise ValueError("n_users_train and n_users_test must be >= 1")
        if self.items_per_user < self.min_profile + 1:
            raise ValueError(f"items_per_user must be >= min_profile + 1 = {self.min_profile + 1}")
        for name in ("train_examples_per_user", "test_examples_per_user"):
            n = getattr(self, name)
            if not 1 <= n <= self.items_per_user - self.min_profile:
                raise ValueError(
                    f"{name} must be in [1, items_per_user - min_profile] = "
                    f"[1, {self.items_per_user - self.min_profile}]; got {n}"
                )


@dataclass
class UserStyle:
    """The hidden per-user writing style (never written into the data, only expressed through it)."""

    user_id: str
    persona: str
    tone: str
    favourite_aspects: tuple[str, str]
    favourite_categories: tuple[str, ...]
    structure: str
    heading: str
    opening: str
    closing: str
    signature: str
    signoff: str | None
    british: bool
    base_words: int
    exclaim: float
    rating_bias: int


# ----------------------------------------------------------------------------------------------------------------
# lexicon: categories, aspects, tones, personas, habits, templates (data in words.json, next to this module)

_LEXICON_FILE = "words.json"
# Styles the renderer knows how to lay out (see _ReviewWriter.render), so they live with the code, not the data.
STRUCTURES = ("paragraphs", "block", "bullets", "headed", "numbered")


def _freeze(x: Any) -> Any:
    """Read-only copy (dict -> mappingproxy, list -> tuple), so nothing can change the shared cached lexicon and
    with it every later dataset in the process. Sequences keep their order, and `random` draws from a tuple exactly
    as from a list, so freezing changes no output."""
    if isinstance(x, dict):
        return MappingProxyType({k: _freeze(v) for k, v in x.items()})
    if isinstance(x, list):
        return tuple(_freeze(v) for v in x)
    return x


@functools.cache
def lexicon() -> Mapping[str, Any]:
    """The generator's word lists and templates, read from `words.json` on first use and cached (read-only).

    Loaded lazily rather than at import, so that importing the package reads no file. JSON keeps object key order,
    and the generator draws from lists and key orders with a seeded `random.Random`, so the file's order is part of
    the output: see its `_about` notes before editing it."""
    text = resources.files(__package__).joinpath(_LEXICON_FILE).read_text(encoding="utf-8")
    return _freeze(json.loads(text))


# ----------------------------------------------------------------------------------------------------------------
# generation


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _words(text: str) -> int:
    return len(text.split())


def _agreement(noun_phrase: str) -> dict[str, str]:
    """Verb/pronoun forms for a noun phrase: "the mids" -> are/they, "the grip on wet roads" -> is/it."""
    head = re.split(r" (?:of|on|at|in) ", noun_phrase)[0].split()[-1]
    plural = head.endswith("s") and not head.endswith("ss")
    return (
        {"is": "are", "s": "", "pron": "they", "has": "have"}
        if plural
        else {"is": "is", "s": "s", "pron": "it", "has": "has"}
    )


def _make_user(rng: random.Random, idx: int, signature: str) -> UserStyle:
    lex = lexicon()
    tone = rng.choice(list(lex["tones"]))
    cats = list(lex["categories"])
    rng.shuffle(cats)
    return UserStyle(
        user_id=f"demo{idx:03d}",
        persona=rng.choice(list(lex["personas"])),
        tone=tone,
        favourite_aspects=tuple(rng.sample(lex["universal_aspects"], 2)),  # type: ignore[arg-type]
        favourite_categories=tuple(cats[:3]),
        structure=rng.choice(STRUCTURES),
        heading=rng.choice(lex["headings"]),
        opening=rng.choice(list(lex["openings"])),
        closing=rng.choice(list(lex["closings"])),
        signature=signature,
        signoff=rng.choice(lex["signoffs"]) if rng.random() < 0.5 else None,
        british=rng.random() < 0.4,
        base_words=rng.choice([170, 200, 230]),
        exclaim={"enthusiastic": 0.45, "warm": 0.15}.get(tone, 0.0),
        rating_bias={"enthusiastic": 1, "warm": 1, "critical": -1}.get(tone, 0),
    )


class _ReviewWriter:
    """Writes one review of one product in one user's style; `rng` is the review's own generator."""

    def __init__(self, user: UserStyle, rng: random.Random, category: str, product: str, rating: int):
        self.u, self.rng, self.cat, self.product, self.rating = user, rng, category, product, rating
        self.lex = lex = lexicon()
        self.c = lex["categories"][category]
        self.t = lex["tones"][user.tone]
        self.p = lex["personas"][user.persona]
        self.short = self.c.get("short") or product.split(" ", 1)[1]
        self.slots = {
            "product": product,
            "short": self.short,
            "plural": self.c["plural"],
            "it": self.c["it"],
            "it_cap": _cap(self.c["it"].replace("them", "they")),
            "It": _cap(self.c["it"].replace("them", "they")),
            "material": rng.choice(self.c["material"]),
            "wear": rng.choice(self.c["wear"]),
            "color": rng.choice(lex["colours"]),
            "minutes": rng.choice([5, 10, 15, 20, 40]),
            "price": f"${rng.randint(*self.c['price'])}",
            "duration": rng.choice(lex["durations"]),
            "rating": rating,
        }
        self.used_templates: set[str] = set()  # vary sentence shapes within a review before repeating one
        self.anecdotes = rng.sample(self.p["anecdote"], len(self.p["anecdote"]))
        self.slots.update({f"wear_{k}": v for k, v in _agreement(self.slots["wear"]).items()})

    def fill(self, template: str, **extra: Any) -> str:
        return template.format(**{**self.slots, **extra})

    def polarity(self) -> bool:
        """True = positive. Probability follows the rating, so a 3-star review is genuinely mixed."""
        return self.rng.random() < {1: 0.1, 2: 0.25, 3: 0.5, 4: 0.8, 5: 0.95}[self.rating]

    def end(self, sentence: str) -> str:
        if sentence.endswith(".") and self.rng.random() < self.u.exclaim:
            return sentence[:-1] + "!"
        return sentence

    def generic(self, aspect: str, positive: bool) -> str:
        detail = (
            self.rng.choice(self.c["aspects"][aspect])
            if aspect in self.c["aspects"]
            else f"the {self.lex['aspect_labels'].get(aspect, aspect).lower()}"
        )
        other = self.rng.choice([b for b in self.c["brands"] if b not in self.product])
        compare = self.c.get("compare") or [
            t.format(other=other, plural=self.c["plural"]) for t in self.lex["default_comparisons"]
        ]
        pool = self.lex["positive_templates" if positive else "negative_templates"]
        tpl = self.rng.choice([t for t in pool if t not in self.used_templates] or pool)
        self.used_templates.add(tpl)
        adj = self.rng.choice(self.t["pos"] if positive else self.t["neg"])
        s = self.fill(
            tpl,
            detail=detail,
            Detail=_cap(detail),
            adj=adj,
            **_agreement(detail),
            intens=self.rng.choice(self.t["intens"]),
            when=self.rng.choice(self.p["when"]),
            consequence=self.rng.choice(self.lex["consequences"]),
            comparison=self.rng.choice(compare),
        )
        return self.end(s)

    def elaborate(self, aspect: str, positive: bool, used: set[str]) -> str | None:
        options = [t for t in self.lex["elaborations"][aspect]["pos" if positive else "neg"] if t not in used]
        if not options:
            return None
        tpl = self.rng.choice(options)
        used.add(tpl)
        return self.end(self.fill(tpl))

    def verdicts(self) -> dict[str, str]:
        r = self.rating
        v = self.lex["verdicts"]["good" if r >= 4 else "mixed" if r == 3 else "bad"]
        short = self.rng.choice(v["short"])
        long_ = self.rng.choice(self.t["good"] if r >= 3 else self.t["bad"])
        recommend = v["recommend"]
        return {
            "verdict_short": short,
            "verdict_long": f"{long_}, and at {r} out of 5 {v['fit']}",
            "yes_no": v["yes_no"],
            "answer": v["answer"],
            "recommend": recommend,
            "recommend_lc": recommend if recommend.startswith("I ") else recommend[0].lower() + recommend[1:],
            "audience": self.rng.choice(self.p["audience"]),
        }

    def write(self, target_words: int, min_words: int) -> str:
        u, rng, lex = self.u, self.rng, self.lex
        v = self.verdicts()
        opening = [
            self.fill(
                rng.choice(lex["openings"][u.opening]),
                intro=rng.choice(self.p["intro"]),
                reason=rng.choice(lex["reasons"]),
                **v,
            )
        ]
        context = [self.end(self.fill(lex["context"], use=self.c["use"], when=rng.choice(self.p["when"])))]
        if rng.random() < 0.5:
            context.append(f"{_cap(self.fill(self.anecdotes.pop()))}.")
        # Favourite aspects first and in depth (2 sentences each), then 2 category aspects briefly.
        sections: list[tuple[str, bool, list[str]]] = []
        used: set[str] = set()
        for a in u.favourite_aspects:
            pos = self.polarity()
            sents = [self.generic(a, pos), self.elaborate(a, pos, used)]
            sections.append((a, pos, [s for s in sents if s]))
        cat_aspects = list(self.c["aspects"])
        rng.shuffle(cat_aspects)
        for a in cat_aspects[:2]:
            pos = self.polarity()
            sections.append((a, pos, [self.generic(a, pos)]))
        pol = {a: p for a, p, _ in sections}
        closing = [
            self.fill(
                rng.choice(lex["closings"][u.closing]),
                fav0=u.favourite_aspects[0],
                fav1=u.favourite_aspects[1],
                pol0="good" if pol[u.favourite_aspects[0]] else "not so good",
                pol1="good" if pol[u.favourite_aspects[1]] else "not so good",
                **v,
            )
        ]

        def render() -> str:
            return self.render(opening, context, sections, closing)

        # Grow towards this review's length, favourites first, so long-winded users dwell on what they care about.
        fillers = 0
        while _words(render()) < max(target_words, min_words):
            i = fillers % len(sections)
            a, pos, sents = sections[i]
            extra = self.elaborate(a, pos, used) if a in lex["elaborations"] else None
            if fillers % 5 == 4 and self.anecdotes:
                extra = f"{rng.choice(lex['example_leads'])}: {self.fill(self.anecdotes.pop())}."
            for _ in range(8):  # avoid saying exactly the same sentence twice in one review
                if extra is not None and extra not in sents:
                    break
                extra = self.generic(a, pos)
            sents.append(extra)
            fillers += 1
        self._add_signature(sections)
        text = render()
        if u.signoff:
            text += "\n\n" + u.signoff
        return _spell(text, u.british)

    def _add_signature(self, sections: list[tuple[str, bool, list[str]]]) -> None:
        """The user's recurring phrase, appended to one or two sentences (never to every review: p = 0.85)."""
        if self.rng.random() > 0.85:
            return
        picks = self.rng.sample(range(len(sections)), k=min(len(sections), self.rng.choice([1, 1, 2])))
        for i in picks:
            sents = sections[i][2]
            j = self.rng.randrange(len(sents))
            s = sents[j]
            if s[-1] in ".!" and not s.endswith("?"):
                sents[j] = f"{s[:-1]}, {self.u.signature}{s[-1]}"

    def render(
        self, opening: list[str], context: list[str], sections: list[tuple[str, bool, list[str]]], closing: list[str]
    ) -> str:
        u = self.u
        intro = " ".join(opening + context)
        label = lambda a: self.lex["aspect_labels"].get(a, _cap(a))
        if u.structure == "block":
            body = [" ".join(s for _, _, sents in sections for s in sents)]
            return " ".join([intro] + body + closing)
        if u.structure == "paragraphs":
            favs = [" ".join(sents) for _, _, sents in sections[:2]]
            rest = " ".join(s for _, _, sents in sections[2:] for s in sents)
            return "\n\n".join([intro, *favs, rest, " ".join(closing)])
        if u.structure == "bullets":
            pros = [f"- {' '.join(sents)}" for _, p, sents in sections if p]
            cons = [f"- {' '.join(sents)}" for _, p, sents in sections if not p] or ["- Nothing worth mentioning."]
            return "\n\n".join(
                [
                    intro,
                    "Pros:\n" + "\n".join(pros or ["- Not much, sadly."]),
                    "Cons:\n" + "\n".join(cons),
                    " ".join(closing),
                ]
            )
        if u.structure == "headed":
            parts = [f"{u.heading.format(L=label(a))}\n{' '.join(sents)}" for a, _, sents in sections]
            return "\n\n".join([intro, *parts, " ".join(closing)])
        # numbered
        parts = [f"{i}. {label(a)}. {' '.join(sents)}" for i, (a, _, sents) in enumerate(sections, 1)]
        return "\n\n".join([intro, "\n".join(parts), " ".join(closing)])


def _spell(text: str, british: bool) -> str:
    table = lexicon()["spelling"]["us_to_uk" if british else "uk_to_us"]

    def sub(m: re.Match) -> str:
        w = m.group(0)
        r = table.get(w.lower())
        if r is None:
            return w
        return _cap(r) if w[0].isupper() else r

    return re.sub(r"[A-Za-z]+", sub, text)


def _user_items(user: UserStyle, rng: random.Random, n: int, min_words: int) -> list[dict[str, Any]]:
    """The user's `n` reviews, oldest first, with strictly increasing dates and no repeated product."""
    day = _dt.date(2021, 1, 1) + _dt.timedelta(days=rng.randrange(400))
    categories = lexicon()["categories"]
    items, seen = [], set()
    for i in range(n):
        while True:
            cat = rng.choice(user.favourite_categories) if rng.random() < 0.75 else rng.choice(list(categories))
            c = categories[cat]
            product = c.get("name", "{brand} {model}").format(
                brand=rng.choice(c["brands"]), model=rng.choice(c["models"])
            )
            if product not in seen:
                seen.add(product)
                break
        rating = min(5, max(1, rng.choice([2, 3, 4, 4, 5]) + user.rating_bias + rng.choice([-1, 0, 0, 1])))
        target = user.base_words + rng.randint(-25, 25)
        text = _ReviewWriter(user, rng, cat, product, rating).write(target, min_words)
        day += _dt.timedelta(days=rng.randint(3, 60))
        items.append(
            {
                "id": f"{user.user_id}-r{i:02d}",
                "title": f"{product} ({cat})",
                "text": text,
                "date": day.isoformat(),
                "rating": rating,
                "_category": cat,
                "_product": product,
            }
        )
    return items


def _query(item: dict[str, Any]) -> str:
    return (
        f"Write a review of {item['_product']} ({item['_category']}) for a reviewer who rated it "
        f"{item['rating']} out of 5."
    )


def _example(user: UserStyle, items: list[dict[str, Any]], i: int) -> dict[str, Any]:
    public = lambda it: {k: v for k, v in it.items() if not k.startswith("_")}
    return {
        "id": items[i]["id"],
        "user_id": user.user_id,
        "input": _query(items[i]),
        "output": items[i]["text"],
        "profile": [public(it) for it in reversed(items[:i])],
    }


def make_demo_dataset(
    n_users_train: int = 40, n_users_test: int = 12, items_per_user: int = 6, seed: int = 0, **kw: Any
) -> dict[str, list[dict[str, Any]]]:
    """Generate the dataset in memory: {"user/train", "user/dev", "temporal/train", "temporal/dev"} -> examples.

    user split: train users and dev users are disjoint; each user's last `train_examples_per_user` (train) or
        `test_examples_per_user` (dev) reviews are examples, all their earlier reviews the profile.
    temporal split: every user; their latest review -> dev, the earlier ones with >= min_profile history -> train
        (so temporal/dev profiles contain temporal/train targets, as in LongLaMP's temporal setting).
    Extra keyword arguments are `DemoDataConfig` fields.
    """
    cfg = DemoDataConfig(
        n_users_train=n_users_train, n_users_test=n_users_test, items_per_user=items_per_user, seed=seed, **kw
    )
    n = cfg.n_users_train + cfg.n_users_test
    order = random.Random(f"flythinker-demo-signatures-{seed}")
    sigs = list(lexicon()["signatures"])
    order.shuffle(sigs)
    users, histories = [], []
    for idx in range(n):
        # One generator per user, seeded from (seed, user index): adding users never changes existing ones.
        rng = random.Random(f"flythinker-demo-{seed}-{idx}")
        user = _make_user(rng, idx, sigs[idx % len(sigs)])
        users.append(user)
        histories.append(_user_items(user, rng, cfg.items_per_user, cfg.min_words))
    split_rng = random.Random(f"flythinker-demo-split-{seed}")
    perm = list(range(n))
    split_rng.shuffle(perm)
    train_ids, test_ids = sorted(perm[: cfg.n_users_train]), sorted(perm[cfg.n_users_train :])
    k = cfg.items_per_user
    out: dict[str, list[dict[str, Any]]] = {"user/train": [], "user/dev": [], "temporal/train": [], "temporal/dev": []}
    for ids, name, m in (
        (train_ids, "user/train", cfg.train_examples_per_user),
        (test_ids, "user/dev", cfg.test_examples_per_user),
    ):
        for u in ids:
            out[name] += [_example(users[u], histories[u], i) for i in range(k - m, k)]
    for u in range(n):
        out["temporal/train"] += [_example(users[u], histories[u], i) for i in range(cfg.min_profile, k - 1)]
        out["temporal/dev"].append(_example(users[u], histories[u], k - 1))
    return out


def user_styles(n_users: int = 52, seed: int = 0) -> list[UserStyle]:
    """The hidden styles behind `make_demo_dataset(seed=seed)` (users in id order), for analysis and tests."""
    order = random.Random(f"flythinker-demo-signatures-{seed}")
    sigs = list(lexicon()["signatures"])
    order.shuffle(sigs)
    return [_make_user(random.Random(f"flythinker-demo-{seed}-{i}"), i, sigs[i % len(sigs)]) for i in range(n_users)]


def write_demo_dataset(out_dir: str | Path, seed: int = 0, **kw: Any) -> dict[str, Path]:
    """Write `make_demo_dataset(seed=seed, **kw)` as `<out_dir>/{user,temporal}/{train,dev}.jsonl` plus a README.md.

    Returns {"user/train": path, ...}. Files are byte-identical for the same arguments."""
    out = Path(out_dir)
    data = make_demo_dataset(seed=seed, **kw)
    paths: dict[str, Path] = {}
    for split, rows in data.items():
        p = out / f"{split}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        paths[split] = p
    counts = ", ".join(f"{k}: {len(v)} examples / {len({r['user_id'] for r in v})} users" for k, v in data.items())
    args = ", ".join(f"{k}={v!r}" for k, v in sorted({"seed": seed, **kw}.items()))
    # The README still names `flythinker.demo_data` (this module's former path): changing the text would change
    # the written files, which are promised byte-identical to those of earlier versions for the same arguments.
    (out / "README.md").write_text(
        "# flythinker demo dataset (synthetic, generated)\n\n"
        f"Synthetic product reviews by synthetic users with hidden per-user writing styles, written by "
        f"`flythinker.demo_data.write_demo_dataset({args})`; generic schema (profile = earlier reviews, newest "
        f"first); user split (disjoint users) and temporal split (latest review per user -> dev). {counts}. "
        f"No real people or products; free to redistribute.\n",
        encoding="utf-8",
    )
    return paths


__all__ = ["DemoDataConfig", "UserStyle", "make_demo_dataset", "user_styles", "write_demo_dataset"]
