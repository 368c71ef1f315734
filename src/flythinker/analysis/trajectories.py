"""Latent reasoning trajectories (the paper's App. H, Figure 7): where the Reasoner's states move over a response, per
user, and whether users whose trajectories point the same way write alike.

Owns: `TrajectoryConfig` (the `flythinker analyze trajectories` settings), choosing users (`select_users`), the
Reasoner's teacher-forced states over a response (`response_states`), the per-user direction (`trajectory_direction`:
least-squares slope of state on relative position), the t-SNE projection (`tsne_2d`, scikit-learn), the figure
(`plot_trajectories`), and the quantitative companion the paper lacks (`direction_cosines`, `text_similarity`,
`mantel_spearman`): the rank correlation between users' direction cosines in the full state space and the TF-IDF
similarity of their reference texts, with a permutation p-value. `run_trajectories` runs it all and writes
trajectories.png and trajectories.json. What it means: docs/analyses.md.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import UserError

PLOT_FILE, JSON_FILE = "trajectories.png", "trajectories.json"
MIN_USERS = 3
"""The rank correlation runs over user pairs: 3 users give 3 pairs, the fewest it is defined on."""


@dataclass
class TrajectoryConfig:
    """What `flythinker analyze trajectories` computes."""

    checkpoint: str = ""
    """A FlyThinker checkpoint directory (one with a Reasoner: save_pretrained / trainer output)."""
    data: str = ""
    """Dataset file/directory/LongLaMP config (as `flythinker data`); the prompts use the checkpoint's training
    data settings."""
    split: str | None = None
    """Split for directories / hub configs."""
    users: int = 5
    """Users to analyse (seeded choice among those with at least 2 examples); at least 3."""
    examples_per_user: int = 2
    """Examples per user (seeded; fewer when a user has fewer). Each is one trajectory; a user's direction pools
    them."""
    max_positions: int = 64
    """Response positions per example that enter t-SNE (evenly spaced); the directions use every position."""
    perplexity: float = 0.0
    """t-SNE perplexity; 0 = min(30, (points - 1) / 3), so a few dozen points work."""
    permutations: int = 999
    """Permutations of the users for the p-value (all of them when there are no more than this)."""
    seed: int = 0
    """Seeds the choice of users and examples, t-SNE and the permutations."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16, float16, or auto (bf16 where the hardware computes it natively, see flythinker.utils.native_bf16)."""
    out: str = "out/trajectories"
    """Output directory (trajectories.png, trajectories.json)."""

    def check(self) -> TrajectoryConfig:
        """Every setting valid (one-line UserError naming the flag), before any file is read."""
        for name in ("checkpoint", "data", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise UserError(f"--{name} is required")
        for name, low in (("users", MIN_USERS), ("examples_per_user", 1), ("max_positions", 2),
                          ("permutations", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                why = " (the rank correlation needs at least 3 user pairs)" if name == "users" else ""
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= {low}{why}; got {v!r}")
        if not isinstance(self.perplexity, (int, float)) or not math.isfinite(self.perplexity) \
                or self.perplexity < 0:
            raise UserError(f"--perplexity must be a finite number >= 0 (0 = automatic); got {self.perplexity!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"--dtype must be auto, float32, bfloat16 or float16; got {self.dtype!r}")
        return self


# ----------------------------------------------------------------------------------------------------------------
# the pieces, one function each


def select_users(examples: Sequence[Any], n_users: int, per_user: int, seed: int) -> dict[str, list[Any]]:
    """`n_users` users (seeded) among those with at least 2 examples with a non-empty reference, and up to
    `per_user` of each one's examples (seeded), in file order. Too few such users is a UserError."""
    by_user: dict[str, list[Any]] = {}
    for ex in examples:
        if (ex.output or "").strip():
            by_user.setdefault(str(ex.user_id), []).append(ex)
    eligible = sorted(u for u, exs in by_user.items() if len(exs) >= 2)
    if len(eligible) < n_users:
        raise UserError(f"--users {n_users}: the data has only {len(eligible)} user(s) with at least 2 examples "
                        f"with a reference ({len(by_user)} user(s) in all); pass a smaller --users (>= {MIN_USERS}) "
                        f"or more data")
    rng = random.Random(seed)
    chosen = rng.sample(eligible, n_users)
    out = {}
    for u in chosen:
        exs = by_user[u]
        keep = sorted(rng.sample(range(len(exs)), min(per_user, len(exs))))
        out[u] = [exs[k] for k in keep]
    return out


def response_states(model: Any, tokenizer: Any, data_cfg: Any, example: Any) -> np.ndarray:
    """The Reasoner's final-layer states r_i (Eq. 4/7, `FlyThinker.reason`) at the response positions of one
    example, teacher-forced on its reference: prompt + reference (cut to the training target budget), the closing
    EOS left out. Returns (R, H_R) float32; R >= 2 (a shorter response is a UserError naming the example)."""
    import torch

    from ..data import encode_example

    feats = encode_example(example, tokenizer, data_cfg, with_response=True)
    prompt, response = feats["prompt_ids"], feats["response_ids"][:-1]
    if len(response) < 2:
        raise UserError(f"example {example.id!r}: its reference is {len(response)} token(s); a trajectory needs 2")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + response], dtype=torch.long, device=device)   # (1, P + R)
    with torch.no_grad():
        states, _ = model.reason(ids, torch.ones_like(ids))                    # (1, P + R, H_R)
    return states[0, len(prompt):].float().cpu().numpy()                       # (R, H_R)


def relative_positions(n: int) -> np.ndarray:
    """(n,) position along a response of n tokens: 0 at the first, 1 at the last."""
    return np.linspace(0.0, 1.0, n)


def trajectory_direction(trajectories: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None
                         ) -> np.ndarray:
    """App. H's "linear regression from early to later reasoning tokens": the least-squares slope of the state on
    the relative position, pooled over one user's examples with an intercept of its own for each example (so
    where an example's states sit does not enter, only how they move).

    trajectories: per example (T_e, D) states, T_e >= 2. positions: per example (T_e,) relative positions
    (default `relative_positions(T_e)`). Returns (D,): the change of the state from the start (0) to the end (1)
    of a response."""
    num, den = 0.0, 0.0
    for k, S in enumerate(trajectories):
        S = np.asarray(S, dtype=np.float64)
        t = relative_positions(len(S)) if positions is None else np.asarray(positions[k], dtype=np.float64)
        tc = t - t.mean()                                   # (T_e,)
        num = num + tc @ (S - S.mean(axis=0))               # (D,)
        den += float(tc @ tc)
    if den == 0:
        raise ValueError("a trajectory direction needs at least two distinct positions")
    return np.asarray(num, dtype=np.float64) / den


def subsample_positions(n: int, k: int) -> np.ndarray:
    """(<= k,) evenly spaced indices into n positions, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


def auto_perplexity(n_points: int) -> float:
    return float(min(30.0, max(1.0, (n_points - 1) / 3)))


EXACT_TSNE_MAX_POINTS = 250
"""Up to this many points t-SNE runs exactly (O(N^2) per step, yet faster than Barnes-Hut's tree at this size)."""


def tsne_2d(points: np.ndarray, seed: int, perplexity: float = 0.0) -> tuple[np.ndarray, float]:
    """t-SNE (scikit-learn, PCA init, seeded) of (N, D) points to (N, 2); returns (coordinates, perplexity used).
    perplexity 0 = `auto_perplexity(N)`; it must be below N. Exact up to `EXACT_TSNE_MAX_POINTS`, Barnes-Hut above,
    with OpenMP held to torch's thread count (`utils.set_threads`): Barnes-Hut otherwise starts a thread per core
    and, on a busy 2-core machine, was measured 12x slower than on one thread."""
    try:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise UserError("the trajectories analysis needs scikit-learn: pip install 'flythinker[analysis]'") from None
    import torch

    n = len(points)
    perp = perplexity or auto_perplexity(n)
    if perp >= n:
        raise UserError(f"--perplexity {perp:g} must be below the number of points ({n}); lower it or pass 0")
    method = "exact" if n <= EXACT_TSNE_MAX_POINTS else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, method=method)
    with threadpool_limits(limits=torch.get_num_threads()):
        return tsne.fit_transform(np.asarray(points, dtype=np.float64)), perp


def direction_cosines(directions: np.ndarray) -> np.ndarray:
    """(U, D) directions -> (U, U) cosine similarities (0 for a zero direction)."""
    norms = np.linalg.norm(directions, axis=1, keepdims=True)            # (U, 1)
    unit = directions / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def text_similarity(texts: Sequence[str]) -> np.ndarray:
    """(U, U) TF-IDF cosine similarity of the texts (scikit-learn defaults: lowercased words of 2+ characters,
    smoothed idf, L2-normalised rows)."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError:
        raise UserError("the trajectories analysis needs scikit-learn: pip install 'flythinker[analysis]'") from None
    try:
        X = TfidfVectorizer().fit_transform(list(texts))                  # (U, vocabulary), rows unit length
    except ValueError:  # no word in any text
        return np.zeros((len(texts), len(texts)))
    return np.asarray((X @ X.T).todense(), dtype=np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def mantel_spearman(a: np.ndarray, b: np.ndarray, permutations: int = 999, seed: int = 0
                    ) -> tuple[float, float | None, int]:
    """Spearman correlation between two (U, U) symmetric matrices over the U(U-1)/2 user pairs, with a one-sided
    permutation p-value for "positive" (a Mantel test: the users of `b` are permuted, since pairs sharing a user
    are not independent). Every permutation is used when U! <= `permutations` (exact p = share with rho >= the
    observed), else `permutations` seeded random ones (p = (1 + count) / (1 + permutations)).
    Returns (rho, p, permutations used); rho NaN and p None when a side is constant."""
    U = len(a)
    iu = np.triu_indices(U, 1)
    rho = spearman(a[iu], b[iu])
    if math.isnan(rho):
        return rho, None, 0
    if math.factorial(U) <= permutations:
        perms = [np.array(p) for p in itertools.permutations(range(U))]
        null = np.array([spearman(a[iu], b[p][:, p][iu]) for p in perms])
        return rho, float(np.mean(null >= rho - 1e-12)), len(perms)
    rng = np.random.default_rng(seed)
    null = np.array([spearman(a[iu], b[p][:, p][iu]) for p in (rng.permutation(U) for _ in range(permutations))])
    return rho, float((1 + np.sum(null >= rho - 1e-12)) / (1 + permutations)), permutations


def plot_trajectories(coords: np.ndarray, user_of: np.ndarray, position_of: np.ndarray, users: Sequence[str],
                      arrows: np.ndarray, out_path: str | Path, title: str = "") -> Path:
    """Figure 7: the t-SNE points of every user in one colour (fainter early, stronger late) and an arrow per user
    along its fitted direction from the start to the end of a response. Written as a PNG (Agg canvas, atomic).

    coords: (N, 2); user_of: (N,) user index; position_of: (N,) relative position in [0, 1]; arrows: (U, 2, 2)
    start and end point per user."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    from ..safeio import atomic_write_bytes_via

    fig = Figure(figsize=(6.4, 5.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    from matplotlib import colormaps

    for u, name in enumerate(users):
        color = colormaps["tab10"](u % 10)
        sel = user_of == u
        rgba = np.array([to_rgba(color, 0.2 + 0.7 * float(t)) for t in position_of[sel]]).reshape(-1, 4)
        ax.scatter(coords[sel, 0], coords[sel, 1], s=14, c=rgba)
        ax.scatter([], [], s=14, color=color, label=f"user {name}")  # the legend shows the full colour
        (x0, y0), (x1, y1) = arrows[u]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops={"arrowstyle": "-|>", "color": color, "lw": 2.2, "mutation_scale": 16})
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "Reasoner latent trajectories (t-SNE; arrows: early → late)", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    atomic_write_bytes_via(out_path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return out_path


# ----------------------------------------------------------------------------------------------------------------
# the analysis


def check_reasoner_checkpoint(ckpt: Path) -> Any:
    """The data settings (prompts as in training) of a FlyThinker checkpoint with a Reasoner, checked without
    loading it; anything else (no checkpoint, a damaged one, another method's, an SFT one without a Reasoner) is
    one UserError naming it."""
    from ..config import from_dict
    from ..data import DataConfig
    from ..inference import checkpoint_method, checkpoint_train_config, validate_checkpoint

    meta = validate_checkpoint(ckpt)
    method = checkpoint_method(ckpt)
    if method != "flythinker" or not meta.get("has_reasoner"):
        what = "has no Reasoner (an SFT checkpoint)" if method in ("flythinker", "sft") else \
            f"is a {method!r} checkpoint"
        raise UserError(f"{ckpt}: {what}; latent trajectories need a FlyThinker checkpoint with a Reasoner")
    saved = checkpoint_train_config(ckpt).get("data")
    return from_dict(DataConfig, dict(saved) if isinstance(saved, dict) else {},
                     where=f"{ckpt}/train_config.json data")


def load_reasoner_model(ckpt: Path, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint `check_reasoner_checkpoint` accepted (`inference.load_checkpoint`)."""
    from ..inference import load_checkpoint
    from ..methods.flythinker.model import FlyThinker

    model, tok = load_checkpoint(ckpt, dtype)
    if not isinstance(model, FlyThinker) or model.reasoner is None:
        raise UserError(f"{ckpt}: has no Reasoner; latent trajectories need a FlyThinker checkpoint with one")
    return model, tok


def run_trajectories(cfg: TrajectoryConfig, log: Any = print) -> dict[str, Any]:
    """Load the checkpoint and the data, run the Reasoner over each chosen user's examples, project, fit, plot and
    test; writes `out/trajectories.png` and `out/trajectories.json` and returns the summary (what the verb's JSON
    line holds). Every input is checked before the model loads."""
    from ..data import load_examples
    from ..safeio import atomic_write_text, check_output_dir, check_output_file, exclusive_lock

    cfg.check()
    ckpt, out = Path(cfg.checkpoint), Path(cfg.out)
    check_output_dir(out, "--out")
    for name in (PLOT_FILE, JSON_FILE):
        check_output_file(out / name, "--out")
    data_cfg = check_reasoner_checkpoint(ckpt)
    examples = load_examples(cfg.data, task=data_cfg.task, split=cfg.split)
    chosen = select_users(examples, cfg.users, cfg.examples_per_user, cfg.seed)
    users = list(chosen)
    model, tok = load_reasoner_model(ckpt, cfg.dtype)

    # states per example (full space), and the subsampled points that go into t-SNE
    per_user_states: list[list[np.ndarray]] = []
    points, user_of, example_of, position_of = [], [], [], []
    example_rows: list[dict[str, Any]] = []
    for u, name in enumerate(users):
        states_u = []
        for ex in chosen[name]:
            S = response_states(model, tok, data_cfg, ex)                 # (R, H_R)
            states_u.append(S)
            keep = subsample_positions(len(S), cfg.max_positions)
            t = relative_positions(len(S))[keep]
            points.append(S[keep])
            user_of += [u] * len(keep)
            example_of += [len(example_rows)] * len(keep)
            position_of.append(t)
            example_rows.append({"id": ex.id, "user": name, "positions": len(S)})
        per_user_states.append(states_u)
    X = np.concatenate(points)                                             # (N, H_R)
    user_of_a, example_of_a = np.array(user_of), np.array(example_of)
    position_of_a = np.concatenate(position_of)                            # (N,)
    coords, perplexity = tsne_2d(X, cfg.seed, cfg.perplexity)              # (N, 2)

    directions = np.stack([trajectory_direction(s) for s in per_user_states])  # (U, H_R)
    arrows = np.zeros((len(users), 2, 2))
    for u in range(len(users)):
        rows = [np.flatnonzero(example_of_a == e) for e in np.unique(example_of_a[user_of_a == u])]
        slope = trajectory_direction([coords[r] for r in rows], [position_of_a[r] for r in rows])   # (2,)
        sel = user_of_a == u
        center, tbar = coords[sel].mean(axis=0), position_of_a[sel].mean()
        arrows[u] = [center - tbar * slope, center + (1 - tbar) * slope]   # the fitted line at t = 0 and t = 1

    cos = direction_cosines(directions)                                    # (U, U)
    refs = [" ".join(ex.output for ex in chosen[name]) for name in users]
    sim = text_similarity(refs)                                            # (U, U)
    rho, p, n_perm = mantel_spearman(cos, sim, cfg.permutations, cfg.seed)
    within, between = _consistency(per_user_states)

    summary = {
        "out": str(out), "plot": str(out / PLOT_FILE), "json": str(out / JSON_FILE), "checkpoint": str(ckpt),
        "users": len(users), "examples": len(example_rows), "points": len(X), "state_dim": int(X.shape[1]),
        "tsne_shape": list(coords.shape), "perplexity": perplexity,
        "direction_fit": "least-squares slope of state on relative position (0 first response token, 1 last), "
                         "pooled over a user's examples with one intercept per example",
        "text_similarity": "TF-IDF cosine of the users' concatenated references",
        "spearman_rho": None if math.isnan(rho) else rho, "p_value": p, "permutations": n_perm,
        "pairs": len(users) * (len(users) - 1) // 2,
        "within_user_cosine": within, "between_user_cosine": between,
    }
    detail = {**summary, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
              "user_ids": users, "example_rows": example_rows,
              "direction_norm": np.linalg.norm(directions, axis=1).tolist(),
              "direction_cosine": cos.tolist(), "text_similarity_matrix": sim.tolist(),
              "arrows_2d": arrows.tolist(),
              "points_2d": [{"x": float(x), "y": float(y), "user": users[u], "example": example_rows[e]["id"],
                             "position": float(t)}
                            for (x, y), u, e, t in zip(coords, user_of_a, example_of_a, position_of_a)]}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    with exclusive_lock(out, "--out"):
        plot_trajectories(coords, user_of_a, position_of_a, users, arrows, out / PLOT_FILE)
        atomic_write_text(out / JSON_FILE, json.dumps(detail, indent=2) + "\n")
    for u, name in enumerate(users):
        others = [(cos[u, v], users[v]) for v in range(len(users)) if v != u]
        best = max(others)
        log(f"user {name}: {len(per_user_states[u])} example(s), direction norm {np.linalg.norm(directions[u]):.3f}, "
            f"closest direction: user {best[1]} (cosine {best[0]:+.3f})")
    rho_s = "n/a (a side is constant)" if math.isnan(rho) else f"{rho:+.3f}"
    p_s = "" if p is None else f", one-sided permutation p = {p:.3f} ({n_perm} permutations)"
    log(f"direction cosine vs reference TF-IDF similarity over {summary['pairs']} user pairs: Spearman rho = "
        f"{rho_s}{p_s}")
    log(f"wrote {out / PLOT_FILE}, {out / JSON_FILE}")
    return summary


def _consistency(per_user_states: list[list[np.ndarray]]) -> tuple[float | None, float | None]:
    """Mean cosine between the directions of two examples of one user, and of two examples of different users
    (None where no such pair): whether a direction belongs to the user rather than to the example."""
    dirs = [(u, trajectory_direction([S])) for u, states in enumerate(per_user_states) for S in states]
    if len(dirs) < 2:
        return None, None
    D = direction_cosines(np.stack([d for _, d in dirs]))
    within, between = [], []
    for i, j in itertools.combinations(range(len(dirs)), 2):
        (within if dirs[i][0] == dirs[j][0] else between).append(D[i, j])
    return (float(np.mean(within)) if within else None), (float(np.mean(between)) if between else None)


__all__ = ["EXACT_TSNE_MAX_POINTS", "JSON_FILE", "MIN_USERS", "PLOT_FILE", "TrajectoryConfig", "auto_perplexity",
           "check_reasoner_checkpoint", "direction_cosines", "load_reasoner_model", "mantel_spearman",
           "plot_trajectories", "relative_positions", "response_states", "run_trajectories", "select_users",
           "spearman", "subsample_positions", "text_similarity", "trajectory_direction", "tsne_2d"]
