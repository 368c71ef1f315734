"""Reasoning-text teachers: where the text a think-then-generate method trains on comes from, computed once per
example and cached.

A teacher reads what the prompt shows of an example (the retrieved history items and the query, as
`flythinker.data.prompts.user_message` renders them; never the reference response, so what the model learns to
write before its response is something it can write at inference) and returns a short text about it. CoT trains
on that text as its reasoning span; a method that conditions on a summary of the history (LLM-TRSR) can ask the
same teachers with another `instruction`. Three kinds, chosen by `TeacherConfig.name`:

  * `extractive` (default): an offline, deterministic feature summary of the history (typical length, recurring
    openings and phrases, tone markers, the closest item's structure) in 2-5 plain sentences. No model runs.
  * `self`: the base (untrained) Generator prompted to analyse the history; greedy, capped at `max_tokens`.
  * `endpoint`: any OpenAI-compatible chat server, through the LLM judge's client (`evaluation.judge`: retries,
    back-off, timeouts); an unreachable server is one line naming the URL.

Owns the teachers, the teacher input (`TeacherInput`, `teacher_inputs`), the cache (`TeacherCache`: JSON lines,
one entry per (teacher input, teacher settings) fingerprint, appended with fsync under a lock, a torn last line
dropped) and the one entry point `teacher_texts`, which asks a teacher only for the entries the cache lacks.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..config import ConfigError
from ..data.config import DataConfig
from ..data.schema import Example, item_text
from ..safeio import check_output_file, decode_line, fingerprint
from ..utils import UserError

TeacherName = Literal["extractive", "self", "endpoint"]
TEACHERS: tuple[str, ...] = ("extractive", "self", "endpoint")

REASONING_INSTRUCTION = (
    "Before writing, analyse how this user writes. In 2 to 5 plain sentences, describe the typical length of their "
    "texts, the phrases and openings they reuse, their tone, and how their closest past text is structured. Do not "
    "write the requested text itself."
)
"""What the model teachers (`self`, `endpoint`) are asked for CoT's reasoning span."""

ANALYST_SYSTEM = "You are a careful reader who analyses a person's writing style."
"""The system message of the `self` teacher's chat prompt."""

CACHE_SUFFIX = ".cache"
"""The cache file's suffix next to a data file: deliberately not a data suffix (.jsonl, .json, ...), so loading the
data's directory never reads the cache as data."""


@dataclass
class TeacherConfig:
    """Which teacher writes the reasoning text, and how to reach it."""

    name: TeacherName = "extractive"
    """extractive (offline feature summary of the history, deterministic), self (the base Generator prompted to
    analyse the history) or endpoint (an OpenAI-compatible chat server at `url`)."""
    max_tokens: int = 128
    """Most tokens the self / endpoint teacher may write per example."""
    cache: str = ""
    """JSON-lines cache of teacher outputs: a path; "" = next to the data when the caller knows it, else
    $FLYTHINKER_CACHE/teachers/<name>.jsonl; "none" = no cache (recomputed every time)."""
    generator: str = ""
    """self: the model that analyses ("" = the method's Generator, model.generator; a directory or hub id)."""
    url: str = ""
    """endpoint: base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1)."""
    model: str = ""
    """endpoint: the model name sent in each request."""
    api_key_env: str = "FLYTHINKER_TEACHER_API_KEY"
    """endpoint: environment variable holding a bearer token, sent only when set."""
    timeout: float = 60.0
    """endpoint: seconds per request."""
    retries: int = 2
    """endpoint: extra attempts after a refused connection, timeout or 5xx/429 reply."""
    backoff: float = 1.0
    """endpoint: first back-off delay in seconds (doubles per retry)."""
    workers: int = 4
    """endpoint: concurrent requests."""

    def __post_init__(self) -> None:
        if self.name not in TEACHERS:
            raise ConfigError(f"teacher name must be one of {', '.join(TEACHERS)}; got {self.name!r}")
        for key, low in (("max_tokens", 1), ("retries", 0), ("workers", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"teacher {key} must be an integer >= {low}; got {v!r}")
        for key, strict in (("timeout", True), ("backoff", False)):
            v = getattr(self, key)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and \
                (v > 0 if strict else v >= 0)
            if not ok:
                raise ConfigError(f"teacher {key} must be a finite number {'>' if strict else '>='} 0; got {v!r}")


@dataclass
class TeacherInput:
    """What a teacher reads of one example: the prompt's view of it, never the reference response."""

    example_id: str
    task: str
    query: str
    items: list[dict[str, Any]] = field(default_factory=list)
    """The retrieved history items, in prompt order (best first under bm25)."""
    message: str = ""
    """The user message as the prompt renders it (history block under its budget, then the query)."""

    def content(self) -> dict[str, Any]:
        """The fingerprinted part (the id is left out: two examples showing the same thing share an entry)."""
        return {"task": self.task, "query": self.query, "items": self.items, "message": self.message}


def teacher_inputs(examples: Sequence[Example], tokenizer: Any, data: DataConfig,
                   store: Any = None) -> list[TeacherInput]:
    """The teacher's view of each example, under the same retrieval and budgets as the prompt."""
    from ..data.prompts import resolve_task, user_message
    from ..data.retrieval import select_profile

    out = []
    for ex in examples:
        task = resolve_task(data, ex)
        items = select_profile(ex, task, data.retrieval, data.k, data.seed, store=store)
        out.append(TeacherInput(ex.id, task, ex.input, [dict(it) for it in items],
                                user_message(ex, tokenizer, data, store=store)))
    return out


class Teacher(Protocol):
    name: str
    batch_size: int
    """How many inputs one `generate` call takes (the cache is appended after each call)."""

    def settings(self) -> dict[str, Any]:
        """Everything that decides the texts (part of every cache key)."""

    def generate(self, inputs: Sequence[TeacherInput]) -> list[str]:
        """One text per input, in order."""


# ----------------------------------------------------------------------------------------------------------------
# extractive: a feature summary, no model

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def _lexicon(words: str) -> frozenset[str]:
    return frozenset(words.split())


_STOP = _lexicon(
    "a an the and or but if of to in on at for with by from as is are was were be been being it its this that these "
    "those i me my we our you your he she they them their his her so not no do does did have has had will would can "
    "could should just very too also than then there here what which who when where how all any some more most")
_FIRST_PERSON = _lexicon("i i'm i've i'd i'll me my mine myself we we're we've our ours us")
_POSITIVE = _lexicon(
    "love loved loves great excellent amazing awesome best beautiful perfect wonderful enjoy enjoyed enjoyable "
    "recommend recommended fantastic favorite favourite nice good happy brilliant solid pleased impressive fun")
_NEGATIVE = _lexicon(
    "bad worst poor disappointed disappointing boring hate hated terrible awful waste broken problem problems issue "
    "issues bug bugs fail fails failed wrong annoying cheap mediocre sadly unfortunately")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _quote(words: Sequence[str]) -> str:
    return '"' + " ".join(words).replace('"', "'") + '"'


def _sentences(text: str) -> int:
    return max(1, len(_SENTENCE_END.findall(text.strip())) + (0 if re.search(r"[.!?]\s*$", text.strip()) else 1))


def _recurring_phrases(token_lists: list[list[str]], limit: int = 3) -> list[tuple[str, ...]]:
    """Word 3- and 2-grams, not all stop words, found in at least two texts (in one text: at least twice), most
    widespread first, longer first, earliest first; a phrase inside one already picked is skipped."""
    several = len(token_lists) > 1
    stats: dict[tuple[str, ...], list[int]] = {}          # gram -> [texts containing it, occurrences, first seen]
    order = 0
    for toks in token_lists:
        seen: set[tuple[str, ...]] = set()
        for n in (3, 2):
            for i in range(len(toks) - n + 1):
                g = tuple(toks[i: i + n])
                if all(w in _STOP for w in g):
                    continue
                s = stats.setdefault(g, [0, 0, order])
                order += 1
                s[1] += 1
                if g not in seen:
                    s[0] += 1
                    seen.add(g)
    found = [g for g, (docs, count, _) in stats.items() if (docs >= 2 if several else count >= 2)]
    found.sort(key=lambda g: (-stats[g][0], -stats[g][1], -len(g), stats[g][2]))
    picked: list[tuple[str, ...]] = []
    for g in found:
        joined = " " + " ".join(g) + " "
        if any(joined in " " + " ".join(p) + " " for p in picked):
            continue
        picked.append(g)
        if len(picked) == limit:
            break
    return picked


def extractive_analysis(items: Sequence[dict[str, Any]]) -> str:
    """2-5 plain sentences about the user's shown history: typical length, openings, recurring phrases, tone, and
    the structure of the closest (first shown) item. Deterministic; a feature summary, not a model's reasoning."""
    texts = [item_text(it).strip() for it in items if item_text(it).strip()]
    if not texts:
        return ("No earlier writing by this user is shown, so there is no personal style to match. "
                "The response should answer the request directly in a plain, neutral register.")
    toks = [_words(t) for t in texts]
    lengths = [len(t.split()) for t in texts]
    n = len(texts)
    typical = int(statistics.median(lengths))
    out = []
    span = f" (from {min(lengths)} to {max(lengths)})" if n > 1 and min(lengths) != max(lengths) else ""
    out.append(f"The user's {n} shown past text{'s run' if n > 1 else ' runs'} about {typical} words{span}, so the "
               f"response should be about that long.")

    firsts = [tuple(t[:2]) for t in toks if len(t) >= 2]
    common2 = Counter(firsts).most_common(1)
    common1 = Counter(t[0] for t in toks if t).most_common(1)
    if n > 1 and common2 and common2[0][1] >= 2:
        who = "Both" if n == 2 else "Several of them"
        out.append(f"{who} open the same way, with {_quote(common2[0][0])}.")
    elif n > 1 and common1 and common1[0][1] >= 2:
        out.append(f"They often start with the word {_quote([common1[0][0]])}.")
    elif toks[0]:
        out.append(f"{'They open in different ways, the closest one' if n > 1 else 'It'} with "
                   f"{_quote(toks[0][:4])}.")

    phrases = _recurring_phrases(toks)
    if phrases:
        listed = [_quote(p) for p in phrases]
        joined = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
        out.append(f"Recurring phrase{'s are' if len(listed) > 1 else ' is'} {joined}.")

    words = [w for t in toks for w in t]
    pos = sum(w in _POSITIVE for w in words)
    neg = sum(w in _NEGATIVE for w in words)
    mood = ("positive" if pos > 2 * neg else "critical" if neg > 2 * pos else "mixed") if pos + neg else "neutral"
    person = "personal, in the first person" if sum(w in _FIRST_PERSON for w in words) >= max(1, 0.03 * len(words)) \
        else "impersonal"
    marks = [m for m, ch in (("exclamation marks", "!"), ("questions", "?")) if sum(ch in t for t in texts) * 2 >= n]
    out.append(f"The tone is {mood} and {person}" + (f", with {' and '.join(marks)}" if marks else "") + ".")

    closest = texts[0]
    lines = [ln for ln in closest.splitlines() if ln.strip()]
    paragraphs = len([p for p in re.split(r"\n\s*\n", closest) if p.strip()])
    n_sent = _sentences(closest)
    shape = f"{n_sent} sentence{'s' if n_sent != 1 else ''}"
    if paragraphs > 1:
        shape += f" in {paragraphs} paragraphs"
    if sum(bool(_LIST_LINE.match(ln)) for ln in lines) >= 2:
        shape += " with a list"
    rating = items[0].get("overall") if isinstance(items[0], dict) else None
    label = f" (rated {rating})" if rating not in (None, "") else ""
    ending = "a question" if closest.rstrip().endswith("?") else \
        "an exclamation" if closest.rstrip().endswith("!") else _quote(toks[0][-3:]) if toks[0] else "a fragment"
    out.append(f"The closest past text{label} has {shape} and ends with {ending}.")
    return " ".join(out[:5])


class ExtractiveTeacher:
    """The default teacher: `extractive_analysis` of the retrieved history."""

    name = "extractive"
    batch_size = 256
    VERSION = 1
    """Bumped whenever the analysis changes, so cached texts of an older analysis are not reused."""

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.VERSION}

    def generate(self, inputs: Sequence[TeacherInput]) -> list[str]:
        return [extractive_analysis(inp.items) for inp in inputs]


# ----------------------------------------------------------------------------------------------------------------
# self: the base Generator prompted


class SelfTeacher:
    """The base Generator asked to analyse the history (chat template when it has one), greedy, at most
    `max_tokens` tokens, decoded by the shared loop. The model is loaded on first use, so a fully cached run never
    loads it."""

    name = "self"
    batch_size = 4

    def __init__(self, cfg: TeacherConfig, generator: str = "default", lm: Any = None, tokenizer: Any = None,
                 instruction: str = REASONING_INSTRUCTION):
        self.cfg, self.instruction = cfg, instruction
        self.spec = cfg.generator or generator
        self.lm, self.tokenizer = lm, tokenizer

    def settings(self) -> dict[str, Any]:
        ident = self.spec
        if self.lm is not None:
            ident = str(getattr(getattr(self.lm, "config", None), "_name_or_path", "") or self.spec)
        return {"name": self.name, "generator": ident, "max_tokens": self.cfg.max_tokens,
                "instruction": self.instruction, "system": ANALYST_SYSTEM}

    def _load(self) -> None:
        if self.lm is None:
            from ..models import load_models

            self.lm, _, tok = load_models(self.spec, "none")
            self.tokenizer = self.tokenizer or tok

    def generate(self, inputs: Sequence[TeacherInput]) -> list[str]:
        import torch

        from ..data.collate import collate, encode_prompt, pad_token_id
        from ..data.prompts import format_prompt
        from ..decoding.loop import generate
        from ..hf import context_limit

        self._load()
        tok = self.tokenizer
        cfg = DataConfig(system_prompt=ANALYST_SYSTEM)
        feats = []
        limit = context_limit(self.lm)
        for inp in inputs:
            ids = encode_prompt(format_prompt(f"{inp.message}\n\n{self.instruction}", tok, cfg), tok, cfg)
            if limit is not None and len(ids) + self.cfg.max_tokens > limit:
                raise UserError(f"teacher 'self': the analysis prompt of example {inp.example_id} ({len(ids)} "
                                f"tokens) + max_tokens {self.cfg.max_tokens} exceeds the model's context of {limit}")
            feats.append({"prompt_ids": ids})
        pad = pad_token_id(tok)
        eos = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
        batch = collate(feats, pad, padding_side="left")
        dev = next(self.lm.parameters()).device
        with torch.no_grad():
            out = generate(_PlainLM(self.lm), batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                           max_new_tokens=self.cfg.max_tokens, eos_token_id=eos or None, pad_token_id=pad)
        texts = []
        for row in out.tolist():
            cut = next((k for k, t in enumerate(row) if t in eos), len(row))
            texts.append(" ".join(tok.decode(row[:cut], skip_special_tokens=True).split()))
        return texts


class _PlainLM:
    """One HF causal LM as a `Decodable` for the shared loop (what the SFT model is, without importing the methods
    that import this module's users)."""

    def __init__(self, lm: Any):
        self.lm = lm

    @property
    def training(self) -> bool:
        return self.lm.training

    def eval(self) -> _PlainLM:
        self.lm.eval()
        return self

    def train(self, mode: bool = True) -> _PlainLM:
        self.lm.train(mode)
        return self

    def decode_lms(self) -> list[tuple[str, Any]]:
        return [("Generator", self.lm)]

    def decoder(self, input_ids: Any, attention_mask: Any, cfg: Any) -> Any:
        from ..decoding.loop import CausalLMStepper

        return CausalLMStepper(self.lm, input_ids, attention_mask, cfg)


# ----------------------------------------------------------------------------------------------------------------
# endpoint: an OpenAI-compatible server


class EndpointTeacher:
    """Any OpenAI-compatible chat server (POST {url}/chat/completions), through `evaluation.judge.chat_completion`:
    temperature 0, at most `max_tokens`, `workers` concurrent requests, retries with back-off. The URL is not part
    of the cache key (the same model served elsewhere is the same teacher); the model name is."""

    name = "endpoint"

    def __init__(self, cfg: TeacherConfig, instruction: str = REASONING_INSTRUCTION):
        from ..evaluation.judge import JudgeConfig

        parts = urllib.parse.urlsplit(cfg.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"teacher 'endpoint' needs model.cot.teacher.url, an http(s) URL such as "
                            f"http://127.0.0.1:8000/v1; got {cfg.url!r}")
        if not cfg.model:
            raise UserError("teacher 'endpoint' needs model.cot.teacher.model (the model name the server serves)")
        self.cfg, self.instruction = cfg, instruction
        self.batch_size = 4 * cfg.workers
        self.client = JudgeConfig(url=cfg.url, model=cfg.model, api_key_env=cfg.api_key_env,
                                  timeout=float(cfg.timeout), retries=cfg.retries, backoff=float(cfg.backoff),
                                  temperature=0.0, max_tokens=cfg.max_tokens, workers=cfg.workers)

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.cfg.model, "max_tokens": self.cfg.max_tokens,
                "instruction": self.instruction, "system": ANALYST_SYSTEM}

    def prompt(self, inp: TeacherInput) -> str:
        return f"{ANALYST_SYSTEM}\n\n{inp.message}\n\n{self.instruction}"

    def generate(self, inputs: Sequence[TeacherInput]) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        from ..evaluation.judge import chat_completion

        def one(inp: TeacherInput) -> str:
            try:
                return " ".join(chat_completion(self.client, self.prompt(inp)).split())
            except UserError as e:
                # The judge's wording names the judge; say which setting points at the server instead.
                msg = str(e).removeprefix("judge endpoint ")
                raise UserError(f"teacher endpoint {msg} (model.cot.teacher.url; is the server running?)") \
                    from None

        with ThreadPoolExecutor(max_workers=self.cfg.workers) as pool:
            futures = [pool.submit(one, inp) for inp in inputs]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def make_teacher(cfg: TeacherConfig, generator: str = "default", lm: Any = None, tokenizer: Any = None,
                 instruction: str = REASONING_INSTRUCTION) -> Teacher:
    """The teacher `cfg` names. `generator` (a model spec), or an already loaded `lm` + `tokenizer`, is what the
    self teacher analyses with; `instruction` is what the model teachers are asked."""
    if cfg.name == "extractive":
        return ExtractiveTeacher()
    if cfg.name == "self":
        return SelfTeacher(cfg, generator, lm, tokenizer, instruction)
    return EndpointTeacher(cfg, instruction)


# ----------------------------------------------------------------------------------------------------------------
# the cache


def entry_key(teacher: Teacher, inp: TeacherInput) -> str:
    """The cache key: a fingerprint of what the teacher reads of the example and of the teacher's settings, so an
    edited example (its query, its retrieved items, the rendered budgeted history) or another teacher setting
    misses and is recomputed, while the reference response, which no teacher reads, does not enter."""
    return fingerprint({"teacher": teacher.settings(), "input": inp.content()}, n=32)


def cache_next_to(data_path: str | os.PathLike, teacher_name: str) -> Path:
    """The cache file for a dataset at `data_path`: `<file or directory>.teacher-<name>.cache` beside it (JSON
    lines; see CACHE_SUFFIX for why not .jsonl)."""
    p = Path(data_path)
    return p.with_name(f"{p.name}.teacher-{teacher_name}{CACHE_SUFFIX}")


def cache_path(cfg: TeacherConfig, data_path: str | os.PathLike | None = None) -> Path | None:
    """Where `cfg`'s outputs are cached: cfg.cache when set ("none": nowhere), else next to the data when its path
    is known, else the flythinker cache ($FLYTHINKER_CACHE/teachers/<name>.jsonl)."""
    if cfg.cache.strip().lower() == "none":
        return None
    if cfg.cache:
        return Path(cfg.cache).expanduser()
    if data_path is not None:
        return cache_next_to(data_path, cfg.name)
    from ..default_model import cache_root

    return cache_root() / "teachers" / f"{cfg.name}.jsonl"


class TeacherCache:
    """A JSON-lines file of {"key", "teacher", "id", "text"} entries. Appends are whole lines, flushed and fsynced
    under `<file>.lock` (processes wait for each other: several trainer processes may fill one cache); a torn last
    line, what a kill mid-append leaves, is ignored when read and cut off by the next append. Any other line that
    is not an entry is refused, naming file and line (the path is someone else's file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_output_file(path, "teacher cache")

    def _lock(self):
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path.with_name(self.path.name + ".lock")), timeout=600)

    def load(self) -> dict[str, str]:
        """key -> text of every complete entry (later entries of a key win)."""
        if not self.path.exists():
            return {}
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise UserError(f"teacher cache {self.path}: cannot read ({e.strerror})") from None
        lines = data.split(b"\n")
        out: dict[str, str] = {}
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            torn = lineno == len(lines)                  # no newline after it: an append cut short
            try:
                rec = json.loads(decode_line(raw, self.path, lineno))
                if not (isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("text"), str)):
                    raise ValueError("not an entry")  # noqa: TRY004 -- caught below: file and line
            except (ValueError, UserError):
                if torn:
                    continue
                raise UserError(f"teacher cache {self.path} line {lineno}: not a teacher cache entry; "
                                f"delete the file or point model.cot.teacher.cache elsewhere") from None
            out[rec["key"]] = rec["text"]
        return out

    def append(self, entries: Sequence[dict[str, Any]]) -> None:
        if not entries:
            return
        blob = b"".join(json.dumps(e, ensure_ascii=False).encode("utf-8") + b"\n" for e in entries)
        with self._lock(), open(self.path, "ab+") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":                       # a torn last line: cut it off before appending
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)
            f.seek(0, os.SEEK_END)
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())


def teacher_texts(teacher: Teacher, inputs: Sequence[TeacherInput],
                  cache: str | os.PathLike | TeacherCache | None = None) -> list[str]:
    """One text per input: from the cache where it has the entry, else from `teacher` (in batches of
    `teacher.batch_size`, each appended to the cache as soon as it is computed, so an interrupted run keeps what it
    paid for)."""
    store = cache if isinstance(cache, TeacherCache) else TeacherCache(cache) if cache is not None else None
    have = store.load() if store is not None else {}
    keys = [entry_key(teacher, inp) for inp in inputs]
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in have and k not in todo:
            todo[k] = i
    pending = list(todo.items())
    step = max(1, int(getattr(teacher, "batch_size", 8)))
    for start in range(0, len(pending), step):
        chunk = pending[start: start + step]
        texts = teacher.generate([inputs[i] for _, i in chunk])
        if len(texts) != len(chunk):
            raise RuntimeError(f"teacher {teacher.name} returned {len(texts)} texts for {len(chunk)} inputs")
        entries = [{"key": k, "teacher": teacher.name, "id": inputs[i].example_id, "text": str(t)}
                   for (k, i), t in zip(chunk, texts)]
        if store is not None:
            store.append(entries)
        have.update({e["key"]: e["text"] for e in entries})
    return [have[k] for k in keys]


__all__ = ["ANALYST_SYSTEM", "CACHE_SUFFIX", "REASONING_INSTRUCTION", "TEACHERS", "EndpointTeacher",
           "ExtractiveTeacher", "SelfTeacher", "Teacher", "TeacherCache", "TeacherConfig", "TeacherInput",
           "cache_next_to", "cache_path", "entry_key", "extractive_analysis", "make_teacher", "teacher_inputs",
           "teacher_texts"]
