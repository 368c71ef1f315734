"""The paper's Figures 5 and 6 and Table 4 from a study's ablation rows (the dict `study.run_ablations` returns).

Owns: `minmax_normalize` (Fig. 5's per-metric scale), `reasoner_size_figure` (Fig. 5: every metric normalised
across the Reasoner-depth points and SFT, the "no Reasoner" reference, one line per metric and their mean in bold),
`lambda_figure` (Fig. 6: each metric against λ, SFT dashed), `history_table` (Table 4: FlyThinker and SFT at each
history length k, and their difference) and `write_ablation_figures`, which writes each of them whose axis has at
least two points. Nothing here trains or scores: it only reads the rows' scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..evaluation.metrics import METRIC_LABELS
from ..safeio import atomic_write_bytes_via, atomic_write_text

PLOT_METRICS = ("rouge1", "rougeL", "meteor", "bleu", "bertscore")
"""The metrics of Figures 5 and 6, in the paper's order; those a study did not score are left out."""
MIN_POINTS = 2
"""An axis with fewer points than this gets no figure or table (one point shows no trend)."""
FILES = {"fig5_reasoner_size": "fig5_reasoner_size.png", "fig6_lambda": "fig6_lambda.png",
         "table4_history": "table4_history.md"}
"""What `write_ablation_figures` writes into the ablations folder, by key of the summary's `files`."""


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _axis_rows(ablations: Mapping[str, Any], axis: str) -> list[dict[str, Any]]:
    """The rows of one axis (lam, reasoner_layers, history_k, history_k_sft), sorted by value."""
    return sorted((r for r in ablations.get("rows", []) if r.get("axis") == axis), key=lambda r: r["value"])


def _sft_row(ablations: Mapping[str, Any]) -> dict[str, Any] | None:
    return next((r for r in ablations.get("rows", []) if r.get("axis") == "sft"), None)


def _metric(row: Mapping[str, Any] | None, name: str) -> float | None:
    if row is None:
        return None
    return _num(row.get("dev_nll")) if name == "dev_nll" else _num((row.get("metrics") or {}).get(name))


def _present(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[str]:
    """The metrics at least one of `rows` has a value for."""
    return [m for m in metrics if any(_metric(r, m) is not None for r in rows)]


def _label(metric: str) -> str:
    return "dev NLL" if metric == "dev_nll" else METRIC_LABELS.get(metric, metric)


def minmax_normalize(values: Sequence[float | None]) -> list[float]:
    """Fig. 5's scale: (v - min) / (max - min) over one metric's points, so metrics on 0-1 and 0-100 (BLEU) share
    one axis. A metric equal at every point carries no ranking and sits at 0.5; a missing value is NaN (a gap)."""
    known = [v for v in values if v is not None]
    if not known:
        return [math.nan] * len(values)
    lo, hi = min(known), max(known)
    return [math.nan if v is None else (0.5 if hi == lo else (v - lo) / (hi - lo)) for v in values]


def _figure(ncols: int, nrows: int, width: float, height: float):
    # A Figure on an Agg canvas, not pyplot: no global backend switch, no display needed, nothing left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write_bytes_via(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # never half a plot
    return path


def _where(ablations: Mapping[str, Any]) -> str:
    return (f"{ablations.get('split', '?')} split, {ablations.get('train_examples', '?')} train / "
            f"{ablations.get('eval_examples', '?')} dev examples")


def reasoner_size_figure(ablations: Mapping[str, Any], path: str | Path,
                         metrics: Sequence[str] = PLOT_METRICS) -> Path | None:
    """Fig. 5: x = Reasoner depth (SFT at 0, no Reasoner), one line per metric min-max normalised across these
    points, and their mean in bold. None (nothing written) when fewer than MIN_POINTS depths were run."""
    depths = _axis_rows(ablations, "reasoner_layers")
    if len(depths) < MIN_POINTS:
        return None
    sft = _sft_row(ablations)
    rows = ([sft] if sft is not None else []) + depths
    xs = ([0] if sft is not None else []) + [int(r["value"]) for r in depths]
    names = _present(rows, metrics)
    fig, axes = _figure(1, 1, 6.4, 4.2)
    ax = axes[0][0]
    curves = []
    for m in names:
        ys = minmax_normalize([_metric(r, m) for r in rows])
        curves.append(ys)
        ax.plot(xs, ys, marker="o", alpha=0.75, label=_label(m))
    if curves:  # the mean over the metrics a point has (a missing one is left out, not counted as 0)
        mean = []
        for i in range(len(xs)):
            col = [c[i] for c in curves if not math.isnan(c[i])]
            mean.append(sum(col) / len(col) if col else math.nan)
        ax.plot(xs, mean, color="black", linewidth=3, marker="o", label="mean")
    ax.set_xticks(xs)
    ax.set_xticklabels([("SFT\n(no Reasoner)" if sft is not None and i == 0 else str(x)) for i, x in enumerate(xs)])
    ax.set_xlabel("Reasoner depth (layers of the Generator)")
    ax.set_ylabel("normalised score (min-max across the points)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Reasoner size (Fig. 5): {_where(ablations)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def lambda_figure(ablations: Mapping[str, Any], path: str | Path,
                  metrics: Sequence[str] = PLOT_METRICS) -> Path | None:
    """Fig. 6: one panel per metric (and the dev NLL, when scored) against λ, the λ values evenly spaced in
    increasing order (0 first) as the paper's sweep is roughly geometric; SFT as a dashed line. None (nothing
    written) when fewer than MIN_POINTS λ values were run."""
    lams = _axis_rows(ablations, "lam")
    if len(lams) < MIN_POINTS:
        return None
    sft = _sft_row(ablations)
    names = _present(lams, [*metrics, "dev_nll"])
    ncols = max(1, min(3, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = _figure(ncols, nrows, 4.0, 3.1)
    xs = list(range(len(lams)))
    for ax, m in zip(axes.flat, names):
        ax.plot(xs, [_metric(r, m) if _metric(r, m) is not None else math.nan for r in lams], marker="o",
                label="FlyThinker")
        ref = _metric(sft, m)
        if ref is not None:
            ax.axhline(ref, linestyle="--", color="gray", label="SFT")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{r['value']:g}" for r in lams])
        ax.set_xlabel("λ")
        ax.set_title(_label(m) + (" (lower is better)" if m == "dev_nll" else ""), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Sensitivity to λ (Fig. 6): {_where(ablations)}", fontsize=10)
    return _save(fig, Path(path))


def history_table(ablations: Mapping[str, Any], metrics: Sequence[str] = PLOT_METRICS) -> str | None:
    """Table 4 as markdown: per metric (and dev NLL), SFT and FlyThinker at each history length k and
    FlyThinker − SFT. None when fewer than MIN_POINTS history lengths were run."""
    ft = {r["value"]: r for r in _axis_rows(ablations, "history_k")}
    sft = {r["value"]: r for r in _axis_rows(ablations, "history_k_sft")}
    ks = sorted(set(ft) | set(sft))
    if len(ks) < MIN_POINTS:
        return None

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    def budget(k: int) -> str:
        row = ft.get(k) or sft.get(k) or {}
        return str((row.get("overrides") or {}).get("data.profile_tokens", "?"))

    lines = ["# History length (paper Table 4, App. J)", "",
             f"FlyThinker and SFT at each number k of history items ({_where(ablations)}; the study's reduced "
             "ablation budget). The profile budget grows with k (the same tokens per item): "
             + ", ".join(f"k={k}: {budget(k)}" for k in ks) + " tokens. Δ = FlyThinker − SFT (dev NLL: "
             "negative is better; the other metrics: positive is better).", "",
             "| metric | " + " | ".join(f"k={k} SFT | k={k} FlyThinker | k={k} Δ" for k in ks) + " |",
             "|---|" + "---|---|---|" * len(ks)]
    for m in _present([*ft.values(), *sft.values()], [*metrics, "dev_nll"]):
        cells = []
        for k in ks:
            s, t = _metric(sft.get(k), m), _metric(ft.get(k), m)
            d = None if s is None or t is None else t - s
            cells += [f(s), f(t), "-" if d is None else f"{d:+.4f}"]
        lines.append(f"| {_label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_ablation_figures(ablations: Mapping[str, Any], out_dir: str | Path,
                           metrics: Sequence[str] | None = None) -> dict[str, str]:
    """Write Fig. 5, Fig. 6 and Table 4 into `out_dir` (FILES), each only when its axis has MIN_POINTS points.

    ablations: `run_ablations`'s dict (rows with axis, value, name, metrics, dev_nll, overrides). metrics: the ones
    the study scored (PLOT_METRICS order is kept; None: all of PLOT_METRICS that the rows have).
    Returns {key: path} of the files written (the summary's `files`)."""
    out = Path(out_dir)
    use = [m for m in PLOT_METRICS if metrics is None or m in metrics]
    written: dict[str, str] = {}
    for key, draw in (("fig5_reasoner_size", reasoner_size_figure), ("fig6_lambda", lambda_figure)):
        p = draw(ablations, out / FILES[key], use)
        if p is not None:
            written[key] = str(p)
    table = history_table(ablations, use)
    if table is not None:
        atomic_write_text(out / FILES["table4_history"], table)
        written["table4_history"] = str(out / FILES["table4_history"])
    return written


__all__ = ["FILES", "MIN_POINTS", "PLOT_METRICS", "history_table", "lambda_figure", "minmax_normalize",
           "reasoner_size_figure", "write_ablation_figures"]
