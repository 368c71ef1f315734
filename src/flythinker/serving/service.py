"""What the HTTP layer serves, apart from HTTP: the database, the model behind its generation engine, the prompt
settings and the bounds, plus loading all of it from a `ServeConfig`.

Owns: turning (user, request text) into prompt ids through `inference.Predictor` with the user's history read from
the database once per request, the ids of the items that prompt shows (selected exactly as the prompt selects them:
`data.retrieval.select_profile` with the DataConfig's retrieval/k/seed, cut to the items `render_profile` keeps),
and resolving a request's decode settings (sampling and anti-repetition) against the server's `decode.*` defaults,
so a request that sets nothing decodes as `Predictor` (the study, the generate verb) does with those settings.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.config import DataConfig
from ..decoding.sampling import DecodeConfig
from .config import Limits, ServeConfig
from .db import Database, DatabaseProfiles, FixedProfile
from .engine import GenerationEngine, Sampling
from .errors import ApiError

log = logging.getLogger("flythinker.serving")


@dataclass(frozen=True)
class Prepared:
    """A request ready for the engine: its prompt, the history items the prompt shows, and any further prompt the
    model's decode reads ({"plain": ids}: CoS's prompt without the history)."""

    prompt_ids: list[int]
    retrieved: list[int]
    extra: dict[str, list[int]] = field(default_factory=dict)


class Service:
    def __init__(self, db: Database, model: Any, tokenizer: Any, data_cfg: DataConfig | None = None,
                 decode: DecodeConfig | None = None, limits: Limits | None = None, name: str = "flythinker",
                 batch_wait_ms: float = 5.0, batching: str = "continuous"):
        from ..inference import Predictor

        self.db, self.profiles = db, DatabaseProfiles(db)
        self.model, self.tokenizer = model, tokenizer
        self.data_cfg = data_cfg or DataConfig()
        self.decode = decode or DecodeConfig()
        self.limits = limits or Limits()
        self.name = name
        base = Predictor(model, tokenizer, self.data_cfg, self.decode)
        self.eos_ids, self.pad_id = base.eos_ids, base.pad
        self.engine = GenerationEngine(model, tokenizer, self.eos_ids, self.pad_id, max_batch=self.decode.batch_size,
                                       max_queue=self.limits.max_queue, batch_wait_s=batch_wait_ms / 1000.0,
                                       concurrent=self.decode.concurrent, cpu_threads=self.decode.cpu_threads,
                                       batching=batching)
        # Prompt building shares one fast tokenizer across request threads; HF fast tokenizers may raise "Already
        # borrowed" when two threads encode while one changes truncation settings, so prompts are built one at a
        # time (cheap next to decoding; the engine thread only decodes ids, which is read-only).
        self._prompt_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    @classmethod
    def from_config(cls, cfg: ServeConfig, db: Database | None = None) -> Service:
        """Load the model cfg names (a checkpoint, or an untrained model through the method registry), open and
        migrate the database. The data settings are cfg.data as given (the CLI layers the checkpoint's in)."""
        db = db or Database(cfg.db)
        db.migrate()
        model, tokenizer, name = load_model(cfg)
        return cls(db, model, tokenizer, cfg.data, cfg.decode, cfg.limits, cfg.name or name, cfg.batch_wait_ms,
                   cfg.batching)

    # -- requests -----------------------------------------------------------------------------------------------

    def max_new_tokens(self, requested: int | None, param: str = "max_new_tokens") -> int:
        n = self.decode.max_new_tokens if requested is None else int(requested)
        cap = self.limits.max_new_tokens
        if n < 1:
            raise ApiError(422, f"{param}: must be at least 1; got {n}", param=param)
        if n > cap:
            raise ApiError(422, f"{param}: must be at most {cap} (the server's cap); got {n}", param=param)
        return n

    def sampling(self, temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                 min_new_tokens: int | None = None, max_new_tokens: int | None = None,
                 min_param: str = "min_new_tokens") -> Sampling:
        """A request's decode settings: fields it leaves out come from the server's DecodeConfig. temperature 0 is
        greedy; a temperature > 0 (or a top_p) given by the request turns sampling on. repetition_penalty,
        no_repeat_ngram_size and min_new_tokens (the request's `min_param`, at most max_new_tokens) override the
        server's; penalty_scope is the server's. A bad value is a 422 naming the field."""
        d = self.decode
        anti = {"repetition_penalty": d.repetition_penalty if repetition_penalty is None else repetition_penalty,
                "no_repeat_ngram_size": d.no_repeat_ngram_size if no_repeat_ngram_size is None
                else no_repeat_ngram_size,
                "min_new_tokens": d.min_new_tokens if min_new_tokens is None else min_new_tokens,
                "penalty_scope": d.penalty_scope}
        for name, param in (("repetition_penalty", "repetition_penalty"),
                            ("no_repeat_ngram_size", "no_repeat_ngram_size"), ("min_new_tokens", min_param)):
            try:  # the schemas check request values already; this keeps programmatic callers to one rule
                DecodeConfig(**{name: anti[name]})
            except ValueError as e:
                raise ApiError(422, f"{param}: {e}", param=param) from None
        if max_new_tokens is not None and anti["min_new_tokens"] > max_new_tokens:
            if min_new_tokens is not None:
                raise ApiError(422, f"{min_param}: must be at most max_new_tokens ({max_new_tokens}); got "
                                    f"{anti['min_new_tokens']}", param=min_param)
            anti["min_new_tokens"] = max_new_tokens  # the server's default, within a smaller budget asked for
        if temperature is None:
            sampled = (d.do_sample and d.temperature > 0) or top_p is not None
            temperature = d.temperature if sampled else 0.0
        if temperature <= 0:
            return Sampling(**anti)
        return Sampling(True, float(temperature), float(d.top_p if top_p is None else top_p), int(d.top_k),
                        d.seed if seed is None else int(seed), **anti)

    def prepare(self, user_id: str, text: str) -> Prepared:
        """The prompt for `text` written for `user_id` from their current history (UserNotFound when the user does
        not exist), and the ids of the items it shows, best first. Blocking: call it off the event loop."""
        from ..data.prompts import resolve_task
        from ..data.retrieval import select_profile
        from ..data.schema import Example
        from ..inference import Predictor

        store = FixedProfile(self.db.profile_items(user_id, require_user=True))
        # A stable id: random retrieval seeds by it, so the same request draws the same items.
        digest = hashlib.sha256(f"{user_id}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()[:16]
        example = Example(id=f"req-{digest}", user_id=user_id, input=text, output="")
        cfg = self.data_cfg
        with self._prompt_lock:
            selected = select_profile(example, resolve_task(cfg, example), cfg.retrieval, cfg.k, cfg.seed,
                                      store=store)
            shown = selected[: max(1, cfg.profile_tokens // cfg.min_item_tokens)]  # what render_profile keeps
            enc = Predictor(self.model, self.tokenizer, cfg, self.decode, store=store).encode([example])
        # A method's further prompts (CoS: plain_input_ids, the prompt without the history), unpadded.
        extra = {k[: -len("_input_ids")]: enc[k][0][enc[k[: -len("input_ids")] + "attention_mask"][0] == 1].tolist()
                 for k in enc if k.endswith("_input_ids")}
        return Prepared(enc["input_ids"][0].tolist(), [int(it["item_id"]) for it in shown], extra)

    def health(self) -> dict[str, Any]:
        return {"status": "ok" if self.db.ping() and self.engine.running else "error", "model": self.name,
                "db": self.db.dialect}


def load_model(cfg: ServeConfig) -> tuple[Any, Any, str]:
    """(model on the default device in eval mode, its Reasoner on cfg.reasoner_device when given, tokenizer,
    default served name).

    dtype "auto" is the weights dtype that decodes faster at batch 1 (`decoding.dtype_choice`: measured once and
    cached on a CPU with native bf16, the fixed rule elsewhere). A continuously batching server's load is unknown;
    the request that arrives alone is the one that waits for every step, so its latency decides, and a server known
    to run full batches can say so with an explicit dtype."""
    from ..decoding.concurrency import place_reasoner
    from ..utils import UserError

    if cfg.checkpoint:
        from ..inference import load_checkpoint

        ckpt = Path(cfg.checkpoint).expanduser()
        if not (ckpt / "flythinker.json").is_file():
            raise UserError(f"--checkpoint {ckpt}: not a FlyThinker checkpoint (no flythinker.json)")
        # batch_size=1: "auto" picks the dtype faster at batch 1 (see the docstring).
        model, tok = load_checkpoint(ckpt, cfg.dtype, reasoner_device=cfg.reasoner_device, batch_size=1)
        return model, tok, ckpt.resolve().name
    from ..decoding.dtype_choice import choose_decode_dtype, decode_lms
    from ..methods import get_method
    from ..utils import default_device

    # Built like a training run's fresh model (cfg.model.dtype, fp32 by default), then cast to the serving dtype.
    impl = get_method(cfg.model.method)
    model, tok = impl.build(impl.model_args(cfg.model))  # as the study builds it (CoS: the plain Generator + λ)
    device = default_device()
    model = model.to(device=device)
    choice = choose_decode_dtype(decode_lms(model), 1, cfg.dtype, device=device)  # batch 1: see the docstring
    log.info("%s", choice.describe())
    model = place_reasoner(model.to(dtype=choice.dtype), cfg.reasoner_device)
    log.warning("serving an untrained %s model (pass --checkpoint DIR for a trained one)", cfg.model.method)
    return model.eval(), tok, f"{cfg.model.method}-untrained"


__all__ = ["Prepared", "Service", "load_model"]
