"""The `flythinker` command line: one verb table, one thin module per verb under flythinker/cli/.

Every verb module exposes `add_cli(parser)`, which registers its flags and sets `func`; this file only wires them
up and turns errors into one line on stderr: user errors (UserError, ConfigError, bad flags) exit 2, anything
unforeseen exits 1 with its type and first line (FLYTHINKER_TRACEBACK=1 re-raises it for debugging).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

# verb -> (module implementing it, one-line help). Modules are imported lazily so `--help` stays fast.
VERBS: dict[str, tuple[str, str]] = {
    "data": ("flythinker.cli.data", "inspect personalized datasets (counts, lengths, a rendered prompt)"),
    "train": ("flythinker.cli.train", "train a method: Generator + Reasoner jointly, or SFT without a Reasoner"),
    "generate": ("flythinker.cli.generate", "generate predictions for a dataset (resumable JSONL)"),
    "evaluate": ("flythinker.cli.evaluate", "score prediction files: metrics, position-sensitive plot, paired CIs"),
    "bench": ("flythinker.cli.bench", "benchmarks: decode latency (ms/token) and training step time"),
    "demo": ("flythinker.cli.demo", "end-to-end demo: train FlyThinker and SFT, generate, evaluate, compare"),
    "study": ("flythinker.cli.study", "the full comparison study (methods x splits, CIs, ablations, efficiency)"),
    "analyze": ("flythinker.cli.analyze", "analyses of a trained model: latent trajectories (t-SNE, App. H)"),
    "serve": ("flythinker.cli.serve", "HTTP service: users' histories in a database, personalized generation, "
              "OpenAI-compatible"),
}


class Parser(argparse.ArgumentParser):
    """argparse with the project's error shape: one line on stderr, exit 2 (argparse prints usage + error), and no
    prefix matching (`--train.lr` must not silently mean `--train.lr_generator`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"flythinker: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flythinker", description="FlyThinker: think-while-generating "
                                     "personalized long-form generation (arXiv 2512.06690).")
    parser.add_argument("--version", action="version", version=f"flythinker {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_) in VERBS.items():
        sub.add_parser(verb, help=help_, add_help=False)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help", "--version"):
            print(f"flythinker: error: unknown verb {argv[0]!r}; valid: {', '.join(VERBS)}", file=sys.stderr)
            return 2
        parser.parse_args(argv or ["--help"])
        return 0
    verb = argv[0]
    module = importlib.import_module(VERBS[verb][0])
    parser = Parser(prog=f"flythinker {verb}", description=VERBS[verb][1])
    module.add_cli(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as e:  # --help (0) or a bad flag (2, already reported in one line)
        return e.code if isinstance(e.code, int) else 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..utils import UserError

    try:
        _quiet_libraries()
        rc = args.func(args)
    except (UserError, ConfigError) as e:
        print(f"flythinker: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flythinker: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the last net: an unforeseen failure is still one line, exit 1
        if os.environ.get("FLYTHINKER_TRACEBACK"):
            raise
        text = str(e).strip()
        first = text.splitlines()[0] if text else ""
        print(f"flythinker: error: unexpected {type(e).__name__}{': ' + first if first else ''} "
              f"(FLYTHINKER_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    return int(rc or 0)


def _quiet_libraries() -> None:
    """Per-shard "Loading weights" bars from transformers drown the CLI's own progress; keep warnings."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def print_json_line(obj) -> None:
    """Benchmarks and reports end with one machine-readable JSON line."""
    print(json.dumps(obj, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
