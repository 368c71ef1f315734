"""Optional LLM judge (paper Appendix K, rubric of Figure 9, scores normalized as in Table 5).

Owns: the rubric prompt, the call to any OpenAI-compatible chat endpoint (POST {url}/chat/completions, stdlib
urllib only, timeouts and bounded retries), parsing the 1-5 score, and normalization to 0-1.

Normalization: Table 5 reports 0-1 numbers for a 1-5 rubric without saying how they were mapped. We use min-max,
(s - 1) / 4, which sends the rubric's range exactly onto [0, 1] (1 -> 0, 5 -> 1); s / 5 (1 -> 0.2) is available as
`normalize="div5"`. The raw 1-5 mean is always reported too, so either convention can be recovered.
The reply must be a score only; we take the first integer 1-5 in it. A reply with none counts as unparsed (NaN,
reported), not as an error; a failing endpoint (HTTP error, refused connection, timeout after retries) is a
UserError naming the URL, and the requests not yet sent are cancelled (an unreachable judge fails in about one
request's time, not once per example).

Empty predictions (empty after stripping) are not sent: they get the rubric's lowest score, 1 ("completely
unrelated"), i.e. 0 under the default minmax normalization (0.2 under div5), the judge's form of the rule that a
method writing nothing scores 0 (`flythinker.evaluation.metrics`). `JudgeResult.empty` counts them.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from ..utils import UserError

JudgeNormalize = Literal["minmax", "div5"]
EMPTY_PREDICTION_SCORE = 1.0
"""The raw 1-5 score an empty prediction gets without asking the judge: the rubric's lowest."""

# Figure 9 of the paper, verbatim in content; the three placeholders are filled per example.
RUBRIC = """You are an impartial evaluator tasked with assessing how well an LLM-generated response reflects the \
user's personal style, preferences, and key points by comparing it with the user's real response.

[Scoring Criteria]
[Score 1]: Completely unrelated to the user's real response. Does not follow the instruction or reflect the user's \
personal thoughts and preferences.
[Score 2]: Weakly related to the user's real response. May mention the general topic but lacks the user's key \
content, tone, or insights.
[Score 3]: Partially matches the user's real response. Includes some ideas from the user, but others are missing, \
altered significantly, or feel generic.
[Score 4]: Mostly matches the user's real response. Covers the main points but misses some personal details, tone, \
or nuances.
[Score 5]: Very similar to the user's real response. Conveys the user's core ideas, structure, and style with only \
minor omissions or changes.
You must assign a score based only on the alignment between the LLM-generated response and the user's real response.

Output the numerical score only — no explanations, no extra text.

[Instruction]: {instruction}
[User's real response]: {reference}
[LLM-generated response]: {prediction}
[Score]:"""


@dataclass
class JudgeConfig:
    """Where and how to ask the judge."""

    url: str
    """Base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1); we POST {url}/chat/completions."""
    model: str
    """Model name sent in the request (the paper used GPT-4o / GPT-4o-mini)."""
    api_key_env: str = "FLYTHINKER_JUDGE_API_KEY"
    """Environment variable holding a bearer token, sent only when set."""
    timeout: float = 60.0
    """Seconds per HTTP request."""
    retries: int = 2
    """Extra attempts after a timeout, refused connection or 5xx/429 reply (exponential back-off)."""
    backoff: float = 1.0
    """First back-off delay in seconds (doubles per retry)."""
    temperature: float = 0.0
    max_tokens: int = 8
    workers: int = 4
    """Concurrent requests."""
    normalize: JudgeNormalize = "minmax"
    """"minmax": (s-1)/4 (default); "div5": s/5."""

    def __post_init__(self) -> None:
        """Every setting checked before any request: a bad URL or a non-finite timeout is a one-line error here,
        not a traceback from urllib later."""
        if not self.url:
            raise UserError("--judge-url is empty")
        parts = urllib.parse.urlsplit(str(self.url))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"--judge-url {self.url!r}: not an http(s) URL such as http://127.0.0.1:8000/v1")
        if not self.model:
            raise UserError("--judge-model is required with --judge-url")
        if self.normalize not in ("minmax", "div5"):
            raise UserError(f"judge normalize must be 'minmax' or 'div5'; got {self.normalize!r}")
        for name, low, strict in (("timeout", 0.0, True), ("backoff", 0.0, False), ("temperature", 0.0, False)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                    or (v <= low if strict else v < low):
                raise UserError(f"judge {name} must be a finite number {'>' if strict else '>='} {low:g}; "
                                f"got {v!r}")
        for name, low in (("retries", 0), ("workers", 1), ("max_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise UserError(f"judge {name} must be an integer >= {low}; got {v!r}")


@dataclass
class JudgeResult:
    scores: list[float]
    """Raw 1-5 score per item (NaN where the reply had no score)."""
    normalized: list[float]
    """Per item on 0-1 (NaN where unparsed)."""
    mean_raw: float
    mean_normalized: float
    n: int
    """Items with a score (replies parsed, plus empty predictions)."""
    unparsed: int
    normalize: str
    empty: int = 0
    """Empty predictions: not sent, scored `EMPTY_PREDICTION_SCORE`."""

    def as_dict(self) -> dict[str, Any]:
        return {"mean_raw": self.mean_raw, "mean_normalized": self.mean_normalized, "n": self.n,
                "unparsed": self.unparsed, "empty": self.empty, "normalize": self.normalize}


def build_prompt(instruction: str | None, reference: str, prediction: str) -> str:
    return RUBRIC.format(instruction=(instruction or "(not available)").strip(), reference=reference.strip(),
                         prediction=prediction.strip())


def parse_score(text: str) -> int | None:
    """The first standalone integer 1-5 in the reply ("4", "Score: 4", "4/5" -> 4), else None."""
    m = re.search(r"(?<![\d.])([1-5])(?!\d)(?!\.\d)", text or "")
    return int(m.group(1)) if m else None


def normalize_score(s: float, how: JudgeNormalize = "minmax") -> float:
    if math.isnan(s):
        return math.nan
    return (s - 1.0) / 4.0 if how == "minmax" else s / 5.0


def chat_completion(cfg: JudgeConfig, prompt: str) -> str:
    """One chat completion; returns the assistant's text. Retries transient failures, then raises UserError."""
    endpoint = cfg.url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": cfg.model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    last = ""
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff * 2 ** (attempt - 1))
        req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace").replace("\n", " ")
            last = f"HTTP {e.code} {e.reason}: {detail}".strip()
            if e.code == 429 or e.code >= 500:
                continue
            break  # 4xx other than 429: retrying will not help (bad model name, bad key, ...)
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            last = f"timed out after {cfg.timeout:g}s" if isinstance(reason, TimeoutError) or "timed out" in \
                str(reason) else f"{type(reason).__name__}: {reason}"
            continue
        try:
            data = json.loads(payload)
            return str(data["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"judge endpoint {endpoint} returned an unexpected reply (not an OpenAI chat "
                            f"completion): {payload[:200]!r}") from None
    raise UserError(f"judge endpoint {endpoint} failed after {cfg.retries + 1} attempt(s): {last}")


def judge(cfg: JudgeConfig, predictions: Sequence[str], references: Sequence[str],
          instructions: Sequence[str | None] | None = None) -> JudgeResult:
    """Score every (prediction, reference) pair with the rubric; returns raw and normalized scores.

    An empty prediction is not sent and scores `EMPTY_PREDICTION_SCORE`. The first request that fails for good
    raises its UserError and cancels the requests not yet started."""
    if instructions is None:
        instructions = [None] * len(predictions)
    send = [k for k, p in enumerate(predictions) if (p or "").strip()]
    prompts = [build_prompt(instructions[k], references[k], predictions[k]) for k in send]

    # Set by the first request that fails for good. Cancelling futures from the main thread alone is a race: a
    # worker that finished a failing request can start the next queued one before the main thread sees the error.
    failed = threading.Event()

    def one(prompt: str) -> float:
        if failed.is_set():
            return math.nan  # never read: the run is already ending with the first failure's error
        try:
            s = parse_score(chat_completion(cfg, prompt))
        except BaseException:
            failed.set()
            raise
        return float(s) if s is not None else math.nan

    raw = [EMPTY_PREDICTION_SCORE] * len(predictions)
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        futures = [pool.submit(one, prompt) for prompt in prompts]
        try:
            for k, fut in zip(send, futures):
                raw[k] = fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    norm = [normalize_score(s, cfg.normalize) for s in raw]
    ok = [s for s in raw if not math.isnan(s)]
    ok_n = [s for s in norm if not math.isnan(s)]
    return JudgeResult(scores=raw, normalized=norm, mean_raw=sum(ok) / len(ok) if ok else math.nan,
                       mean_normalized=sum(ok_n) / len(ok_n) if ok_n else math.nan, n=len(ok),
                       unparsed=len(raw) - len(ok), normalize=cfg.normalize, empty=len(raw) - len(send))


__all__ = [
    "EMPTY_PREDICTION_SCORE",
    "RUBRIC",
    "JudgeConfig",
    "JudgeResult",
    "build_prompt",
    "chat_completion",
    "judge",
    "normalize_score",
    "parse_score",
]
