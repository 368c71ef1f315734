"""`flythinker analyze trajectories` (App. H, Figure 7): the direction fit, the rank-correlation test, choosing
users, and the verb end to end on a tiny untrained FlyThinker (PNG written, JSON fields and shapes, bad input one
line)."""

import itertools
import json

import numpy as np
import pytest

from flythinker.analysis.trajectories import (
    direction_cosines,
    mantel_spearman,
    select_users,
    subsample_positions,
    text_similarity,
    trajectory_direction,
    tsne_2d,
)
from flythinker.data import Example
from flythinker.utils import UserError

pytest.importorskip("sklearn")  # the `analysis` / `test` extra; the module imports it only when used


def test_trajectory_direction_recovers_the_slope_whatever_each_example_intercept():
    rng = np.random.default_rng(0)
    d = rng.normal(size=6)                                         # the true direction (D,)
    trajs = []
    for T in (5, 9, 14):                                           # examples of different lengths
        t = np.linspace(0, 1, T)
        trajs.append(rng.normal(size=6) * 10 + t[:, None] * d)     # own intercept, same direction
    assert trajectory_direction(trajs) == pytest.approx(d)
    # explicit positions (as for the subsampled t-SNE points) give the same fit
    t = np.array([0.0, 0.25, 1.0])
    assert trajectory_direction([t[:, None] * d], [t]) == pytest.approx(d)
    with pytest.raises(ValueError, match="two distinct positions"):
        trajectory_direction([np.ones((1, 6))])


def test_direction_cosines_and_text_similarity_shapes():
    D = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    cos = direction_cosines(D)
    assert cos.shape == (4, 4)
    assert cos[0, 0] == pytest.approx(1) and cos[0, 1] == pytest.approx(0) and cos[0, 2] == pytest.approx(-1)
    assert cos[3].tolist() == [0, 0, 0, 0]                         # a zero direction: cosine 0
    sim = text_similarity(["the album is warm", "the album is loud", "parser bug fix"])
    assert sim.shape == (3, 3) and np.diag(sim) == pytest.approx(1)
    assert sim[0, 1] > sim[0, 2] and sim[0, 2] == pytest.approx(0)


def test_mantel_spearman_exact_and_random_permutations():
    rng = np.random.default_rng(1)
    U = 5
    a = rng.random((U, U))
    a = (a + a.T) / 2
    rho, p, n = mantel_spearman(a, a, permutations=999)
    assert rho == pytest.approx(1) and n == 120                    # 5! <= 999: every permutation
    assert p == pytest.approx(1 / 120)                             # only the identity reaches rho = 1
    rho_neg, p_neg, _ = mantel_spearman(a, -a, permutations=999)
    assert rho_neg == pytest.approx(-1) and p_neg == pytest.approx(1.0)
    rho2, p2, n2 = mantel_spearman(a, a, permutations=50, seed=3)  # 50 < 120: random permutations
    assert n2 == 50 and rho2 == pytest.approx(1) and 1 / 51 <= p2 <= 0.1  # (1 + hits) / 51, hits: identity draws
    rho3, p3, n3 = mantel_spearman(a, np.ones((U, U)))             # a constant side: undefined
    assert np.isnan(rho3) and p3 is None and n3 == 0


def _examples(n_users=4, per_user=3):
    words = ["album", "melodies", "warm", "lyrics", "honest", "parser", "commit", "cache", "vocals", "songs"]
    out = []
    for u, k in itertools.product(range(n_users), range(per_user)):
        w = words[u * 2 % len(words)], words[(u * 2 + 1) % len(words)]
        out.append(Example(id=f"u{u}-{k}", user_id=f"u{u}", input=f"Write about {w[0]} {k}.",
                           output=f"I loved this {w[0]} because the {w[1]} are warm and honest; take {k}.",
                           profile=[{"text": f"Earlier review of the {w[0]} and its {w[1]}."}]))
    return out


def test_select_users_is_seeded_and_needs_enough_users():
    exs = _examples(n_users=4) + [Example(id="solo", user_id="solo", input="x", output="one example only")]
    a = select_users(exs, 3, 2, seed=0)
    assert a == select_users(exs, 3, 2, seed=0) and len(a) == 3 and "solo" not in a
    assert all(len(v) == 2 for v in a.values())
    assert any(select_users(exs, 3, 2, seed=s) != a for s in range(1, 6))
    with pytest.raises(UserError, match="--users 5: the data has only 4 user"):
        select_users(exs, 5, 2, seed=0)


def test_subsample_positions_and_tsne_shape():
    assert subsample_positions(100, 5).tolist() == [0, 25, 50, 74, 99]
    assert subsample_positions(3, 64).tolist() == [0, 1, 2]
    pts = np.random.default_rng(0).normal(size=(24, 8))
    xy, perp = tsne_2d(pts, seed=0)
    assert xy.shape == (24, 2) and perp == pytest.approx(23 / 3)
    assert np.array_equal(tsne_2d(pts, seed=0)[0], xy)            # seeded: the same picture every run
    with pytest.raises(UserError, match="--perplexity 30 must be below the number of points"):
        tsne_2d(pts, seed=0, perplexity=30)


# ----------------------------------------------------------------------------------------------------------------
# the verb end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    """An untrained tiny FlyThinker checkpoint, an SFT one (no Reasoner) and 4 users x 3 examples."""
    from flythinker import FlyThinker
    from flythinker.testing import tiny_lm

    root = tmp_path_factory.mktemp("traj")
    generator = tiny_lm("llama", seed=1)
    FlyThinker(generator, tiny_lm("llama", seed=2, num_layers=1), tokenizer=tokenizer).save_pretrained(root / "ckpt")
    FlyThinker(generator, None, tokenizer=tokenizer).save_pretrained(root / "sft")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": e.id, "user_id": e.user_id, "input": e.input, "output": e.output,
                                        "profile": e.profile}) + "\n" for e in _examples()))
    return root


def test_analyze_trajectories_writes_the_figure_and_the_statistics(tiny_run, capsys):
    from flythinker.cli.main import main

    out = tiny_run / "out"
    rc = main(["analyze", "trajectories", "--checkpoint", str(tiny_run / "ckpt"), "--data",
               str(tiny_run / "data.jsonl"), "--users", "3", "--max-positions", "12", "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    last = json.loads(printed[-1])
    assert last["users"] == 3 and last["examples"] == 6 and last["state_dim"] == 32 and last["pairs"] == 3
    assert last["tsne_shape"] == [last["points"], 2] and last["points"] <= 6 * 12
    assert last["permutations"] == 6                               # 3! permutations, all of them
    assert -1 <= last["spearman_rho"] <= 1 and 0 < last["p_value"] <= 1
    assert -1 <= last["within_user_cosine"] <= 1 and -1 <= last["between_user_cosine"] <= 1
    png = (out / "trajectories.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    detail = json.loads((out / "trajectories.json").read_text())
    assert np.array(detail["direction_cosine"]).shape == (3, 3)
    assert np.array(detail["text_similarity_matrix"]).shape == (3, 3)
    assert np.array(detail["arrows_2d"]).shape == (3, 2, 2)
    assert len(detail["points_2d"]) == last["points"]
    assert {p["user"] for p in detail["points_2d"]} == set(detail["user_ids"])
    assert any(line.startswith("direction cosine vs reference TF-IDF similarity") for line in printed)


@pytest.mark.parametrize("case,match", [
    ("missing", "not found"),
    ("sft", "has no Reasoner"),
    ("other-method", "is a 'cot' checkpoint"),
    ("few-users", "--users 5: the data has only 4 user"),
    ("two-users", "--users must be an integer >= 3"),
])
def test_analyze_trajectories_bad_input_is_one_line(tiny_run, tmp_path, capsys, case, match):
    import shutil

    from flythinker.cli.main import main

    ckpt, users = tiny_run / "ckpt", "3"
    if case == "missing":
        ckpt = tmp_path / "nope"
    elif case == "sft":
        ckpt = tiny_run / "sft"
    elif case == "other-method":
        ckpt = tmp_path / "cot"
        shutil.copytree(tiny_run / "ckpt", ckpt)
        meta = json.loads((ckpt / "flythinker.json").read_text())
        (ckpt / "flythinker.json").write_text(json.dumps({**meta, "method": "cot"}))
    elif case == "few-users":
        users = "5"
    elif case == "two-users":
        users = "2"
    rc = main(["analyze", "trajectories", "--checkpoint", str(ckpt), "--data", str(tiny_run / "data.jsonl"),
               "--users", users, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and match in err, err
    assert not (tmp_path / "out").exists()                         # refused before anything is written
