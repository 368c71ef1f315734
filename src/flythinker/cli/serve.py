"""`flythinker serve`: the HTTP API (flythinker.serving) over a checkpoint or an untrained model, run by uvicorn."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..utils import UserError


def add_cli(parser: argparse.ArgumentParser) -> None:
    from ..config import add_dataclass_args
    from ..serving.config import ServeConfig

    parser.add_argument("--config", default=None,
                        help="YAML of serve settings (checkpoint, db, host, port, data:, decode:, limits:, ...); "
                             "flags override it")
    add_dataclass_args(parser, ServeConfig)
    parser.set_defaults(func=_cli_main)


def serve_config(args: argparse.Namespace):
    """defaults < the checkpoint's train_config.json `data` (prompts as in training) < --config YAML < flags."""
    from ..config import build_config, from_dict
    from ..data import DataConfig
    from ..inference import checkpoint_train_config
    from ..methods.base import ModelArgs
    from ..serving.config import ServeConfig

    cfg = build_config(ServeConfig, args, args.config)
    if cfg.checkpoint:
        if cfg.model != ModelArgs():
            raise UserError("give --checkpoint (a trained model) or --model.* (an untrained one), not both")
        if not (Path(cfg.checkpoint).expanduser() / "flythinker.json").is_file():
            raise UserError(f"--checkpoint {cfg.checkpoint}: not a FlyThinker checkpoint (no flythinker.json)")
        trained = dict(checkpoint_train_config(Path(cfg.checkpoint)).get("data") or {})
        if trained:
            data = from_dict(DataConfig, trained, where=f"{cfg.checkpoint}/train_config.json data")
            cfg = build_config(ServeConfig, args, args.config, base=ServeConfig(data=data))
    return cfg


def _open_db(url: str):
    from sqlalchemy.exc import SQLAlchemyError

    from ..serving.db import Database

    try:
        db = Database(url)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        db.migrate()
    except SQLAlchemyError as e:
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise UserError(f"--db {db.describe()}: cannot open the database ({first})") from None
    return db


def _cli_main(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serving.app import create_app
    from ..serving.auth import ensure_admin_key
    from ..serving.service import Service, load_model
    from ..utils import set_threads

    set_threads()
    cfg = serve_config(args)
    db = _open_db(cfg.db)
    model, tokenizer, name = load_model(cfg)
    service = Service(db, model, tokenizer, cfg.data, cfg.decode, cfg.limits, cfg.name or name, cfg.batch_wait_ms,
                      cfg.batching)
    try:
        key = ensure_admin_key(db)
    except ValueError as e:
        raise UserError(str(e)) from None
    if key:  # last before serving, so model-loading output cannot bury it
        print(f"flythinker serve: admin key (printed this once; only its hash is stored):\n  {key}",
              file=sys.stderr, flush=True)
    print(f"flythinker serve: model {service.name}, database {db.describe()}, http://{cfg.host}:{cfg.port}/",
          file=sys.stderr, flush=True)
    uvicorn.run(create_app(service), host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m flythinker.cli.serve ...`: the verb without the verb table (same flags and error handling)."""
    from .main import Parser, run

    parser = Parser(prog="flythinker serve", description="the HTTP API: users' histories in a database, "
                                                         "personalized generation, an OpenAI-compatible endpoint")
    add_cli(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
