"""Position-sensitive evaluation (paper §4.4, Figure 4 / Appendix F, Figure 8): score each token-position segment.

Owns: parsing segment boundaries, cutting a text into token-position segments with the Generator's tokenizer
(decode each token slice back to text), scoring every segment with `flythinker.evaluation.metrics`, and the plot
(one subplot per metric, one line per method, matplotlib Agg backend, PNG, written atomically).

A segment [a, b) of a pair is the prediction's tokens a..b-1 and the reference's tokens a..b-1 (both counted with
the same tokenizer, no special tokens). Which pairs a segment scores follows the whole-text rule of the mode
(`flythinker.evaluation.metrics`):
- "mean": a pair counts in a segment when its reference reaches it (the reference's segment is not empty after
  stripping); a prediction that is empty there -- it stopped before a tokens, or wrote nothing at all -- scores 0 on
  every metric, exactly like an empty whole prediction (counted in the segment's "empty"). A pair whose reference
  ends before the segment has nothing to be compared with there and is left out of that segment ("dropped").
  An empty whole reference is a UserError, as in `score_examples`.
- "longlamp": a pair whose segment is empty on either side after stripping is dropped for that segment only
  ("dropped"), and pairs the whole-text pre-processing drops are dropped from every segment.
Decoding a slice of a byte-level BPE can cut a multi-byte character in half at the boundary; the decoder then
yields U+FFFD there, which ROUGE's tokenizer ignores and which affects at most one word per boundary elsewhere.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..safeio import atomic_write_bytes_via
from ..utils import UserError
from .metrics import METRIC_LABELS, Mode, check_metrics, prepare_pairs, score_examples

DEFAULT_BOUNDARIES: tuple[int, ...] = (0, 50, 100, 200, 300)
"""The paper's four segments: [0,50), [50,100), [100,200), [200,300) Generator tokens."""
DEFAULT_SEGMENT_METRICS: tuple[str, ...] = ("rouge1", "rougeL", "bleu", "meteor")
END = math.inf


@dataclass
class Segment:
    start: int
    end: float  # math.inf for an open last segment ("end")

    @property
    def label(self) -> str:
        return f"[{self.start},{'end' if self.end == END else int(self.end)})"


def parse_boundaries(spec: str | Sequence[int | float | str]) -> list[Segment]:
    """"0,50,100,200,300" -> [0,50), [50,100), [100,200), [200,300). A last boundary "end" (or "inf") makes the last
    segment run to the end of the text. Boundaries must be strictly increasing non-negative integers."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    values: list[float] = []
    for i, p in enumerate(parts):
        if isinstance(p, str) and p.lower() in ("end", "inf") and i == len(parts) - 1:
            values.append(END)
            continue
        try:
            v = int(p)
        except (TypeError, ValueError):
            raise UserError(f"segment boundaries must be integers (last may be 'end'); got {p!r}") from None
        if v < 0:
            raise UserError(f"segment boundaries must be >= 0; got {v}")
        values.append(v)
    if len(values) < 2:
        raise UserError("segment boundaries need at least two values, e.g. 0,50,100,200,300")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise UserError(f"segment boundaries must be strictly increasing; got {spec!r}")
    return [Segment(int(a), b) for a, b in itertools.pairwise(values)]


def split_segments(text: str, tokenizer: Any, segments: Sequence[Segment]) -> list[str]:
    """The text of each segment: its token slice decoded back to text (special tokens skipped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for seg in segments:
        stop = len(ids) if seg.end == END else int(seg.end)
        piece = ids[seg.start:stop]
        out.append(tokenizer.decode(piece, skip_special_tokens=True) if piece else "")
    return out


def segment_scores(predictions: Sequence[str | None], references: Sequence[str | None], tokenizer: Any,
                   segments: Sequence[Segment] | str = DEFAULT_BOUNDARIES, metrics: Iterable[str] =
                   DEFAULT_SEGMENT_METRICS, mode: Mode = "mean", seed: int = 0, **score_kw: Any
                   ) -> list[dict[str, Any]]:
    """Score each segment: one dict per segment with "segment" (label), "start", "end", the metric values,
    "n" (pairs scored in that segment), "dropped" (pairs not scored there) and "empty" (scored pairs whose
    prediction is empty there, each scored 0). Which pairs count: see the module docstring."""
    if isinstance(segments, str) or (segments and not isinstance(segments[0], Segment)):
        segments = parse_boundaries(segments)  # type: ignore[arg-type]
    metrics = check_metrics(metrics)
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} references")
    preds, refs, kept = prepare_pairs(predictions, references, mode)  # the whole-text rule (and its errors)
    pred_segs = [split_segments(p, tokenizer, segments) if p else [""] * len(segments) for p in preds]
    ref_segs = [split_segments(r, tokenizer, segments) for r in refs]
    total = len(predictions)
    out = []
    for k, seg in enumerate(segments):
        # "mean": the pairs whose reference reaches this segment (an empty prediction there scores 0);
        # "longlamp": all kept pairs, and score_examples drops those with an empty side here.
        rows = [j for j in range(len(kept)) if mode == "longlamp" or ref_segs[j][k].strip()]
        s = score_examples([pred_segs[j][k] for j in rows], [ref_segs[j][k] for j in rows], metrics=metrics,
                           mode=mode, seed=seed, **score_kw)
        out.append({"segment": seg.label, "start": seg.start, "end": None if seg.end == END else int(seg.end),
                    **s.as_dict(), "dropped": total - s.n, "empty": s.empty})
    return out


def plot_segments(results: dict[str, list[dict[str, Any]]], out_path: str | Path,
                  metrics: Sequence[str] | None = None, title: str | None = None) -> Path:
    """One subplot per metric, one line per method over the segments; written as a PNG (Agg backend, so no display
    is needed; the Agg canvas is used directly, so the caller's pyplot backend is left alone). `results` maps a
    method name to `segment_scores` output. The PNG is written to a temporary file next to `out_path` and renamed
    over it, so a kill never leaves half an image."""
    # A Figure on an Agg canvas, not pyplot: no global backend switch, no display, nothing left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise UserError("no segment scores to plot")
    first = next(iter(results.values()))
    labels = [r["segment"] for r in first]
    if metrics is None:
        metrics = [m for m in first[0] if m not in ("segment", "start", "end", "n", "dropped", "empty")] \
            if first else []
    ncols = max(1, len(metrics) if len(metrics) <= 4 else 3)  # the paper's Figure 8: one row of four
    nrows = max(1, math.ceil(len(metrics) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for method, rows in results.items():
            ax.plot(range(len(rows)), [r.get(m, math.nan) for r in rows], marker="o", label=method)
        ax.set_title(METRIC_LABELS.get(m, m))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlabel("token positions")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    atomic_write_bytes_via(out_path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # never half a plot
    return out_path


__all__ = ["DEFAULT_BOUNDARIES", "DEFAULT_SEGMENT_METRICS", "Segment", "parse_boundaries", "plot_segments",
           "segment_scores", "split_segments"]
