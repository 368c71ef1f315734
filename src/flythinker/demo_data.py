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
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
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
# lexicon: categories, aspects, tones, personas, habits

# Aspects every category has; users pick their two favourites from these, so favourites recur across categories.
UNIVERSAL_ASPECTS = ("price", "build", "design", "setup", "durability", "packaging")

CATEGORIES: dict[str, dict[str, Any]] = {
    "headphones": {
        "plural": "headphones",
        "it": "them",
        "use": "wear them",
        "brands": ["Aurora", "Kestrel", "Nimbus", "Vantor"],
        "models": ["Q20", "Studio 3", "Air Pro", "NC700", "Lite"],
        "material": ["plastic", "aluminum", "leatherette"],
        "wear": ["ear cushions", "headband", "hinges"],
        "price": (39, 349),
        "aspects": {
            "sound": ["the bass", "the mids", "the treble", "the soundstage"],
            "comfort": ["the clamping force", "the ear cushions", "the headband padding"],
            "battery": ["the battery life", "the charging time", "the standby drain"],
            "noise cancelling": ["the noise cancelling", "the transparency mode", "the wind noise handling"],
        },
    },
    "bluetooth speaker": {
        "plural": "speakers",
        "it": "it",
        "use": "use it",
        "brands": ["Brisk", "Halcyon", "Orla", "Tempo"],
        "models": ["Go 2", "Boom", "Mini", "Flare XL", "Pebble"],
        "material": ["rubberized plastic", "fabric mesh", "aluminum"],
        "wear": ["rubber feet", "fabric grille", "charging port"],
        "price": (25, 249),
        "aspects": {
            "sound": ["the bass", "the clarity at high volume", "the stereo pairing"],
            "battery": ["the battery life", "the charging time"],
            "connectivity": ["the Bluetooth range", "the pairing", "the app"],
        },
    },
    "vinyl album": {
        "plural": "records",
        "it": "it",
        "use": "play it",
        "brands": ["The Paper Lanterns", "Mara Quell", "Northbound Static", "Idle Harbor"],
        "models": ["Night Ferry", "Low Tide", "Glass Orchard", "Second Summer", "Copper Lines"],
        "material": ["cardboard", "heavyweight vinyl", "paper"],
        "wear": ["sleeve corners", "inner sleeve", "label"],
        "price": (18, 45),
        "name": "{model} by {brand}",
        "short": "album",
        "compare": ["their previous album", "other records in my collection", "the streaming version"],
        "aspects": {
            "production": ["the production", "the mix", "the drums", "the mastering"],
            "lyrics": ["the lyrics", "the storytelling", "the chorus of the title track", "the wordplay"],
            "vocals": ["the vocals", "the harmonies", "the vocal delivery"],
        },
    },
    "mechanical keyboard": {
        "plural": "keyboards",
        "it": "it",
        "use": "type on it",
        "brands": ["Keyforge", "Lumo", "Tactis", "Ridgeway"],
        "models": ["K65", "TKL Pro", "Mini 60", "Low Profile", "Wave"],
        "material": ["aluminum", "ABS plastic", "PBT plastic"],
        "wear": ["keycaps", "stabilizers", "USB-C port"],
        "price": (45, 229),
        "aspects": {
            "typing feel": ["the switches", "the key travel", "the stabilizers"],
            "noise": ["the typing noise", "the spacebar rattle"],
            "software": ["the companion software", "the RGB settings", "the macros"],
        },
    },
    "coffee grinder": {
        "plural": "grinders",
        "it": "it",
        "use": "grind with it",
        "brands": ["Bravura", "Millstone", "Crema", "Oaken"],
        "models": ["Burr 40", "Precision", "Hand Mill", "Daily", "Pro 64"],
        "material": ["stainless steel", "plastic", "wood"],
        "wear": ["burrs", "hopper", "dial"],
        "price": (29, 299),
        "aspects": {
            "grind consistency": ["the grind consistency", "the espresso setting", "the coarse setting"],
            "noise": ["the motor noise", "the rattle at startup"],
            "cleaning": ["the cleaning", "the retention", "the static"],
        },
    },
    "running shoes": {
        "plural": "running shoes",
        "it": "them",
        "use": "run in them",
        "brands": ["Stride", "Fleetfoot", "Apex", "Tern"],
        "models": ["Glide 5", "Trail X", "Tempo Racer", "Cloudstep", "Daily 2"],
        "material": ["mesh", "foam", "rubber"],
        "wear": ["outsole", "heel counter", "laces"],
        "price": (59, 219),
        "aspects": {
            "fit": ["the fit", "the toe box", "the heel lock"],
            "cushioning": ["the cushioning", "the midsole", "the energy return"],
            "grip": ["the grip on wet roads", "the outsole grip", "the traction on trails"],
        },
    },
    "backpack": {
        "plural": "backpacks",
        "it": "it",
        "use": "carry it",
        "brands": ["Ranger", "Urbane", "Fjellsted", "Nomad"],
        "models": ["Daypack 22", "Commuter", "Roll Top", "Explorer 30", "Sling"],
        "material": ["nylon", "canvas", "recycled polyester"],
        "wear": ["zips", "shoulder straps", "base"],
        "price": (35, 189),
        "aspects": {
            "storage": ["the laptop sleeve", "the pockets", "the main compartment"],
            "comfort": ["the shoulder straps", "the back panel", "the weight distribution"],
            "weatherproofing": ["the water resistance", "the rain cover"],
        },
    },
    "board game": {
        "plural": "board games",
        "it": "it",
        "use": "play it",
        "brands": ["Meeple Works", "Hexagon", "Tall Tale", "Cobalt"],
        "models": ["Harbor Lights", "Kingdom of Salt", "Sky Rails", "Mossgrove", "Deep Orbit"],
        "material": ["cardboard", "wood", "plastic"],
        "wear": ["box corners", "cards", "tokens"],
        "price": (19, 89),
        "aspects": {
            "rules": ["the rulebook", "the learning curve", "the turn structure"],
            "replayability": ["the replayability", "the variety of scenarios", "the expansions"],
            "player count": ["the two-player mode", "the solo mode", "the five-player games"],
        },
    },
    "desk lamp": {
        "plural": "lamps",
        "it": "it",
        "use": "work under it",
        "brands": ["Lumen", "Arcline", "Glow", "Pivot"],
        "models": ["Task 2", "Halo", "Arc LED", "Mini", "Studio"],
        "material": ["aluminum", "plastic", "steel"],
        "wear": ["joint", "touch sensor", "cable"],
        "price": (22, 159),
        "aspects": {
            "brightness": ["the brightness", "the dimming steps", "the color temperature"],
            "flicker": ["the flicker at low brightness", "the light spread"],
            "adjustability": ["the arm", "the head rotation", "the base"],
        },
    },
    "electric kettle": {
        "plural": "kettles",
        "it": "it",
        "use": "use it",
        "brands": ["Boilwell", "Kettlo", "Steamline", "Hearth"],
        "models": ["Rapid", "Temp Control", "Glass 1.7", "Classic", "Mini"],
        "material": ["stainless steel", "glass", "plastic"],
        "wear": ["lid hinge", "base", "handle"],
        "price": (19, 129),
        "aspects": {
            "boil speed": ["the boil time", "the keep-warm function"],
            "temperature control": ["the temperature presets", "the accuracy of the presets"],
            "pouring": ["the spout", "the pour", "the handle"],
        },
    },
}

TONES: dict[str, dict[str, list[str]]] = {
    "enthusiastic": {
        "pos": ["fantastic", "brilliant", "superb", "amazing", "outstanding", "wonderful"],
        "neg": ["a bit disappointing", "not quite there yet", "a little weak", "slightly off"],
        "intens": ["absolutely", "genuinely", "seriously", "really"],
        "good": ["I love it", "it is a joy to use", "it made my day"],
        "bad": ["it bummed me out", "I wanted to love it"],
    },
    "critical": {
        "pos": ["acceptable", "decent", "competent", "better than I expected"],
        "neg": ["poor", "flimsy", "sloppy", "underwhelming", "mediocre at best"],
        "intens": ["frankly", "honestly", "quite"],
        "good": ["it does the job", "I have few complaints"],
        "bad": ["it is not good enough", "the corners were clearly cut"],
    },
    "dry": {
        "pos": ["fine", "adequate", "perfectly serviceable", "solid", "as advertised"],
        "neg": ["mediocre", "forgettable", "not great", "a minor nuisance"],
        "intens": ["reasonably", "more or less", "broadly"],
        "good": ["it works", "no complaints worth writing down"],
        "bad": ["it is not worth the bother", "it could be worse, but not by much"],
    },
    "warm": {
        "pos": ["lovely", "delightful", "charming", "pleasing", "a treat"],
        "neg": ["a shame", "a little fiddly", "not ideal", "a bit of a letdown"],
        "intens": ["really", "so", "truly"],
        "good": ["it makes me smile", "it has become part of my routine"],
        "bad": ["it made me a little sad", "I hoped for more"],
    },
    "analytical": {
        "pos": [
            "well engineered",
            "reliable",
            "above average for the price bracket",
            "measurably better than the competition",
        ],
        "neg": ["inconsistent", "below average", "poorly calibrated", "a clear weak point"],
        "intens": ["noticeably", "measurably", "consistently"],
        "good": ["the numbers back it up", "it performs as specified"],
        "bad": ["the measurements do not support the marketing", "it underperforms its spec sheet"],
    },
}

PERSONAS: dict[str, dict[str, list[str]]] = {
    # anecdote slots: {it} = "it"/"them" (object), {It} = "It"/"They" (subject, verbs in the past tense agree)
    "commuter": {
        "intro": ["I spend about two hours a day on trains", "I commute by bus and train every weekday"],
        "when": ["on my morning commute", "on the train home", "while waiting on the platform"],
        "audience": ["fellow commuters", "anyone who travels daily"],
        "anecdote": [
            "I once left {it} on a crowded train seat and got {it} back the next day",
            "my train was delayed for an hour last week and I was glad to have {it} with me",
            "a fellow passenger asked me about {it} on the platform",
            "{It} survived being squashed in a rush-hour carriage",
        ],
    },
    "home cook": {
        "intro": ["I cook at home almost every night", "I run a small supper club from my kitchen"],
        "when": ["while dinner is in the oven", "on busy weeknights", "during Sunday meal prep"],
        "audience": ["home cooks", "anyone with a busy kitchen"],
        "anecdote": [
            "{It} ended up next to the stove during a dinner party",
            "my flatmate borrowed {it} for a week and did not want to give {it} back",
            "I spilled tomato sauce on {it} and it wiped right off",
            "my supper club guests asked where I found {it}",
        ],
    },
    "student": {
        "intro": ["I am a student on a tight budget", "I am in my final year at university"],
        "when": ["in the library", "during late-night study sessions", "between lectures"],
        "audience": ["students", "anyone on a budget"],
        "anecdote": [
            "{It} came with me through every exam week this term",
            "my roommate asked where I got {it} within a day",
            "I saved up for {it} by skipping takeaways for a month",
            "half my seminar group now has {it} too",
        ],
    },
    "parent": {
        "intro": ["I am a parent of two small kids", "I have three children and very little free time"],
        "when": ["after the kids are in bed", "on the school run", "during nap time"],
        "audience": ["busy parents", "families"],
        "anecdote": [
            "my youngest dropped {it} down the stairs",
            "the kids have already claimed {it} as theirs",
            "{It} survived a birthday party with eight five-year-olds",
            "my eldest figured {it} out before I did",
        ],
    },
    "retiree": {
        "intro": [
            "I retired last year and finally have time for hobbies",
            "I am retired and take my time choosing what to buy",
        ],
        "when": ["in the afternoons", "while the grandchildren visit", "on quiet mornings"],
        "audience": ["people who want something simple", "older users"],
        "anecdote": [
            "my grandson set {it} up for me in five minutes",
            "I showed {it} to my walking group",
            "my neighbour borrowed {it} and bought the same one",
            "I compared {it} side by side with the shop model before deciding",
        ],
    },
    "gamer": {
        "intro": ["I game most evenings", "I stream games a few nights a week"],
        "when": ["during long gaming sessions", "while streaming", "late at night"],
        "audience": ["gamers", "people who sit at a desk all evening"],
        "anecdote": [
            "{It} survived a six-hour session without issue",
            "my viewers noticed the difference right away",
            "my teammates asked about {it} over voice chat",
            "I knocked {it} off the desk during a boss fight",
        ],
    },
    "runner": {
        "intro": ["I run about forty kilometres a week", "I am training for my third marathon"],
        "when": ["after long runs", "on early morning runs", "on recovery days"],
        "audience": ["runners", "anyone who trains outdoors"],
        "anecdote": [
            "{It} got soaked on a rainy half marathon",
            "my running club asked me about {it}",
            "I took {it} on a week-long training camp",
            "{It} came along on a muddy trail race",
        ],
    },
    "musician": {
        "intro": ["I play bass in a local band", "I teach piano and listen critically for a living"],
        "when": ["after rehearsals", "while practising", "when I am arranging songs"],
        "audience": ["musicians", "people with picky ears"],
        "anecdote": [
            "my bandmates argued about {it} for a whole rehearsal",
            "I used {it} to check a mix at two in the morning",
            "{It} came on tour with us for two weeks",
            "one of my students asked to borrow {it}",
        ],
    },
    "remote worker": {
        "intro": ["I work from home full time", "my desk is also my office five days a week"],
        "when": ["during video calls", "between meetings", "in the late afternoon slump"],
        "audience": ["people who work from home", "office workers"],
        "anecdote": [
            "{It} appeared on camera during a big client call",
            "a colleague asked about {it} in a meeting",
            "{It} got me through a week of back-to-back deadlines",
            "I moved {it} between my desk and the kitchen table all month",
        ],
    },
}

SIGNATURES = [
    "for what it's worth",
    "no two ways about it",
    "hand on heart",
    "make of that what you will",
    "truth be told",
    "I kid you not",
    "mark my words",
    "all things considered",
    "believe it or not",
    "if you ask me",
    "and I mean that",
    "no joke",
    "plain and simple",
    "by my reckoning",
    "for better or worse",
    "just saying",
    "take it or leave it",
    "to put it plainly",
    "between you and me",
    "for the record",
    "as far as I can tell",
    "in my humble opinion",
    "no exaggeration",
    "scout's honour",
    "so there you go",
    "as my dad would say",
    "cross my heart",
    "if I'm being picky",
    "go figure",
    "as it turns out",
    "full stop",
    "make no mistake",
    "in a nutshell",
    "let's be honest",
    "fair is fair",
    "without a doubt",
    "as odd as that sounds",
    "and that's saying something",
    "who knew",
    "mind you",
    "no ifs or buts",
    "hats off",
    "rain or shine",
    "when all is said and done",
    "on balance",
    "warts and all",
    "in all fairness",
    "touch wood",
    "fingers crossed",
    "come what may",
    "say what you like",
    "give or take",
    "as they say",
    "I'll be honest",
]
SIGNOFFS = [
    "Cheers!",
    "Happy shopping!",
    "Thanks for reading.",
    "Over and out.",
    "Peace.",
    "Stay curious.",
    "Until next time.",
    "Take care, folks.",
    "That's all from me.",
    "Onwards!",
]
OPENINGS: dict[str, list[str]] = {
    "rating_first": ["{rating}/5 from me.", "Rating: {rating} out of 5.", "{rating} stars, and here is why."],
    "tldr": ["TL;DR: {verdict_short}.", "TL;DR - {verdict_short}."],
    "background": ["Quick background: {intro}.", "Some background first: {intro}."],
    "purchase": ["I bought the {product} {reason}.", "I picked up the {product} {reason}."],
    "question": ["Is the {product} worth it? {answer}.", "So, is the {product} any good? {answer}."],
    "obvious": ["Let me start with the obvious: {verdict_short}.", "First things first: {verdict_short}."],
    "long_time": [
        "Long-time buyer of {plural} here, so I have a few to compare against.",
        "I have owned more {plural} than I care to admit.",
    ],
    "okay_so": ["Okay, so. The {product}.", "Right, the {product}. Where to begin."],
}
CLOSINGS: dict[str, list[str]] = {
    "verdict": ["Verdict: {verdict_long}.", "My verdict: {verdict_long}."],
    "bottom_line": ["Bottom line: {verdict_long}.", "The bottom line is that {verdict_long}."],
    "buy_again": ["Would I buy it again? {yes_no}.", "Would I buy the {short} again? {yes_no}."],
    "hope_helps": ["Hope this helps someone decide.", "I hope this review helps someone."],
    "final_score": ["Final score: {rating}/5.", "Final score: {rating} out of 5."],
    "recommend": ["{recommend} {audience}.", "All in all, {recommend_lc} {audience}."],
    "in_short": ["In short: {fav0} {pol0}, {fav1} {pol1}.", "In short, {fav0} {pol0} and {fav1} {pol1}."],
}
STRUCTURES = ("paragraphs", "block", "bullets", "headed", "numbered")
HEADINGS = ("{L}:", "[{L}]", "## {L}", "{L} -")
REASONS = [
    "to replace one that broke",
    "after reading a lot of reviews",
    "on a whim during a sale",
    "as a birthday present to myself",
    "because a friend kept recommending it",
    "for a trip abroad",
]
DURATIONS = ["two weeks", "a month", "three months", "half a year", "a few days", "six weeks"]
CONSEQUENCES = [
    "gets annoying quickly",
    "takes the shine off",
    "is hard to ignore",
    "I did not expect at this price",
    "matters more than you might think",
    "I notice every single day",
]
COLOURS = ["black", "white", "gray", "navy", "olive", "sand", "red"]
US_TO_UK = {
    "color": "colour",
    "colors": "colours",
    "favorite": "favourite",
    "favorites": "favourites",
    "gray": "grey",
    "aluminum": "aluminium",
    "realize": "realise",
    "realized": "realised",
    "organize": "organise",
    "rubberized": "rubberised",
    "center": "centre",
    "practicing": "practising",
    "kilometers": "kilometres",
    "flavor": "flavour",
    "honor": "honour",
    "traveling": "travelling",
}
UK_TO_US = {"practising": "practicing", "kilometres": "kilometers", "honour": "honor", "favourite": "favorite"}

# {is}/{s}/{pron} agree with the detail ("the bass is", "the mids are"); see _agreement.
POS_TEMPLATES = [
    "{Detail} {is} {intens} {adj}.",
    "I found {detail} {intens} {adj}, especially {when}.",
    "Where the {short} shines is {detail}, which {is} {adj}.",
    "{Detail} turned out to be {adj}, better than on {comparison}.",
    "After {duration}, {detail} {is} still {adj}.",
    "What surprised me most was {detail}: {intens} {adj}.",
    "{Detail} deserve{s} a mention, because {pron} {is} {adj}.",
    "I did not expect much from {detail}, but {pron} {is} {adj}.",
]
NEG_TEMPLATES = [
    "{Detail} {is} {adj}, which {consequence}.",
    "My main complaint is {detail}; {pron} {is} {adj}.",
    "{Detail} could be better; right now {pron} {is} {adj}.",
    "After {duration}, {detail} already feel{s} {adj}.",
    "I expected more from {detail}, and {pron} {is} {adj} compared to {comparison}.",
    "{Detail} {is} where the {short} falls down: {adj}.",
]
# Aspect-specific elaborations for the universal aspects: the depth a user gives to a favourite aspect.
ELABORATIONS: dict[str, dict[str, list[str]]] = {
    "price": {
        "pos": [
            "I paid {price}, which feels fair for what you get.",
            "At {price} it is one of the better deals among {plural}.",
            "For {price} I honestly expected less.",
            "It was {price} when I bought it, and I would happily pay that again.",
        ],
        "neg": [
            "I paid {price}, and that is too much for what you get.",
            "At {price} there are better options among {plural}.",
            "The price has crept up to {price}, which is hard to justify.",
            "For {price} I expected a lot more polish.",
        ],
    },
    "build": {
        "pos": [
            "Nothing creaks or rattles, and the {material} feels solid in the hand.",
            "The {material} parts are well finished with no sharp edges.",
            "You can tell someone cared about the {material} finish.",
        ],
        "neg": [
            "The {material} creaks when you pick {it} up.",
            "There is a visible seam in the {material}, and one part already has a scratch.",
            "The {material} feels cheaper than the photos suggest.",
        ],
    },
    "design": {
        "pos": [
            "The {color} finish looks better in person than in the photos.",
            "It is understated, and the {color} version fits in anywhere.",
            "The proportions are just right and the {color} color is my favorite.",
        ],
        "neg": [
            "The {color} finish shows every fingerprint.",
            "The {color} version looks dated next to other {plural}.",
            "The logo is far too big, which spoils an otherwise clean {color} design.",
        ],
    },
    "setup": {
        "pos": [
            "Setup took about {minutes} minutes and the instructions were clear.",
            "Out of the box it took {minutes} minutes to get going, no manual needed.",
            "Getting started was painless, about {minutes} minutes from box to first use.",
        ],
        "neg": [
            "Setup took me {minutes} minutes because the manual skips a step.",
            "It took {minutes} minutes and a video tutorial to get it working.",
            "The instructions are vague, so the first {minutes} minutes were trial and error.",
        ],
    },
    "durability": {
        "pos": [
            "After {duration} of regular use there is no visible wear on the {wear}.",
            "The {wear} still look{wear_s} new after {duration}.",
            "I have not been gentle with {it}, and the {wear} {wear_has} held up fine.",
        ],
        "neg": [
            "After {duration} the {wear} {wear_is} already showing wear.",
            "The {wear} started to fail after {duration}.",
            "I worry about the {wear}; {it_cap} will not last another year at this rate.",
        ],
    },
    "packaging": {
        "pos": [
            "It arrived in recyclable packaging with hardly any plastic, which I appreciate.",
            "The box was compact and everything was well protected.",
            "Delivery was quick and the packaging was tidy and easy to recycle.",
        ],
        "neg": [
            "It arrived in a box three times its size, wrapped in plastic.",
            "The packaging was damaged on arrival, though the contents survived.",
            "There was so much foam and plastic in the box that it felt wasteful.",
        ],
    },
}
ASPECT_LABELS = {
    "price": "Price",
    "build": "Build quality",
    "design": "Design",
    "setup": "Setup",
    "durability": "Durability",
    "packaging": "Packaging",
}


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
    tone = rng.choice(list(TONES))
    cats = list(CATEGORIES)
    rng.shuffle(cats)
    return UserStyle(
        user_id=f"demo{idx:03d}",
        persona=rng.choice(list(PERSONAS)),
        tone=tone,
        favourite_aspects=tuple(rng.sample(UNIVERSAL_ASPECTS, 2)),  # type: ignore[arg-type]
        favourite_categories=tuple(cats[:3]),
        structure=rng.choice(STRUCTURES),
        heading=rng.choice(HEADINGS),
        opening=rng.choice(list(OPENINGS)),
        closing=rng.choice(list(CLOSINGS)),
        signature=signature,
        signoff=rng.choice(SIGNOFFS) if rng.random() < 0.5 else None,
        british=rng.random() < 0.4,
        base_words=rng.choice([170, 200, 230]),
        exclaim={"enthusiastic": 0.45, "warm": 0.15}.get(tone, 0.0),
        rating_bias={"enthusiastic": 1, "warm": 1, "critical": -1}.get(tone, 0),
    )


class _ReviewWriter:
    """Writes one review of one product in one user's style; `rng` is the review's own generator."""

    def __init__(self, user: UserStyle, rng: random.Random, category: str, product: str, rating: int):
        self.u, self.rng, self.cat, self.product, self.rating = user, rng, category, product, rating
        self.c = CATEGORIES[category]
        self.t = TONES[user.tone]
        self.p = PERSONAS[user.persona]
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
            "color": rng.choice(COLOURS),
            "minutes": rng.choice([5, 10, 15, 20, 40]),
            "price": f"${rng.randint(*self.c['price'])}",
            "duration": rng.choice(DURATIONS),
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
            else f"the {ASPECT_LABELS.get(aspect, aspect).lower()}"
        )
        other = self.rng.choice([b for b in self.c["brands"] if b not in self.product])
        compare = self.c.get("compare") or [
            "my old one",
            f"the {other} I had before",
            f"other {self.c['plural']} I have tried",
            "the previous model",
        ]
        pool = POS_TEMPLATES if positive else NEG_TEMPLATES
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
            consequence=self.rng.choice(CONSEQUENCES),
            comparison=self.rng.choice(compare),
        )
        return self.end(s)

    def elaborate(self, aspect: str, positive: bool, used: set[str]) -> str | None:
        options = [t for t in ELABORATIONS[aspect]["pos" if positive else "neg"] if t not in used]
        if not options:
            return None
        tpl = self.rng.choice(options)
        used.add(tpl)
        return self.end(self.fill(tpl))

    def verdicts(self) -> dict[str, str]:
        r = self.rating
        good = r >= 4
        short = self.rng.choice(
            ["it is a keeper", "this one is worth it", "I am glad I bought it"]
            if good
            else ["it is fine, with caveats", "it is a mixed bag"]
            if r == 3
            else ["I would not buy it again", "save your money"]
        )
        long_ = self.rng.choice(self.t["good"] if r >= 3 else self.t["bad"])
        fit = "it earns its place" if good else "it only just scrapes by" if r == 3 else "it misses the mark"
        long_ = f"{long_}, and at {r} out of 5 {fit}"
        recommend = (
            "I would recommend it to"
            if r >= 4
            else "I would only suggest it to"
            if r == 3
            else "Hard to recommend, even to"
        )
        return {
            "verdict_short": short,
            "verdict_long": long_,
            "yes_no": "Yes, without hesitation"
            if r >= 4
            else "Maybe, if it were on sale"
            if r == 3
            else "No, I would not",
            "answer": "Yes" if r >= 4 else "Sort of" if r == 3 else "Not really",
            "recommend": recommend,
            "recommend_lc": recommend if recommend.startswith("I ") else recommend[0].lower() + recommend[1:],
            "audience": self.rng.choice(self.p["audience"]),
        }

    def write(self, target_words: int, min_words: int) -> str:
        u, rng = self.u, self.rng
        v = self.verdicts()
        opening = [
            self.fill(
                rng.choice(OPENINGS[u.opening]), intro=rng.choice(self.p["intro"]), reason=rng.choice(REASONS), **v
            )
        ]
        context = [self.end(self.fill("I mostly {use} {when}.", use=self.c["use"], when=rng.choice(self.p["when"])))]
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
                rng.choice(CLOSINGS[u.closing]),
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
            extra = self.elaborate(a, pos, used) if a in ELABORATIONS else None
            if fillers % 5 == 4 and self.anecdotes:
                extra = (
                    f"{rng.choice(['Case in point', 'For example', 'True story'])}: {self.fill(self.anecdotes.pop())}."
                )
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
        label = lambda a: ASPECT_LABELS.get(a, _cap(a))
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
    table = US_TO_UK if british else UK_TO_US

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
    items, seen = [], set()
    for i in range(n):
        while True:
            cat = rng.choice(user.favourite_categories) if rng.random() < 0.75 else rng.choice(list(CATEGORIES))
            c = CATEGORIES[cat]
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
    sigs = SIGNATURES[:]
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
    sigs = SIGNATURES[:]
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
