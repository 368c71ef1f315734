"""The copy floors: copy_latest answers with the newest history item's body, copy_retrieved with the BM25 top item's,
an empty profile gives an empty prediction, no model is ever built, and a tiny study writes and scores both rows
next to SFT (predictions through the same fingerprinted writer, no decode timing, no training cost)."""

import json

import pytest

from flythinker.data import DataConfig
from flythinker.data.schema import Example
from flythinker.methods import METHODS, get_method
from flythinker.utils import UserError


def _examples():
    review_profile = [  # newest first, as load_examples orders them
        {"summary": "Fine kettle", "reviewText": "It boils water quickly and the handle stays cool.",
         "overall": "4.0", "date": "2020-03-01"},
        {"summary": "Great headphones", "reviewText": "The bass on these headphones is deep and the noise "
         "cancelling headphones block the train.", "overall": "5.0", "date": "2019-01-01"},
        {"summary": "Meh toaster", "reviewText": "Burns one side of the bread.", "overall": "2.0",
         "date": "2018-01-01"},
    ]
    commit_profile = [
        {"title": "docs: fix typo", "text": "Fix a typo in the README.", "date": "2022-02-01T00:00:00+00:00"},
        {"title": "cat-file: add batch mode", "text": "Teach cat-file a --batch-command mode reading commands "
         "from stdin.", "date": "2021-01-01T00:00:00+00:00"},
    ]
    return [
        Example("r1", "u1", 'Generate the review text written by a reviewer who has given an overall rating of "5.0" '
                'for a product with summary "noise cancelling headphones with deep bass".', "ref r1",
                review_profile, task="product_review"),
        Example("c1", "u2", 'Write the body of the commit message for a commit titled "cat-file: batch-command '
                'stdin".', "ref c1", commit_profile, task="generic"),
        Example("e1", "u3", "anything", "ref e1", [], task="generic"),
    ]


def test_registered_model_free_and_untrained():
    for name in ("copy_latest", "copy_retrieved"):
        m = METHODS[name]
        assert m.model_free and not m.trained and not m.uses_reasoner
        with pytest.raises(UserError, match="no model"):
            m.build(None)
    assert not any(getattr(METHODS[n], "model_free", False) for n in ("sft", "rag", "flythinker"))


def test_copy_latest_is_the_newest_items_body():
    ex = _examples()
    preds = get_method("copy_latest").predict_texts(ex, DataConfig())
    assert preds == [ex[0].profile[0]["reviewText"], ex[1].profile[0]["text"], ""]


def test_copy_retrieved_is_the_bm25_top_items_body():
    ex = _examples()
    # The query names headphones / the batch command: BM25 ranks the older item first in both profiles.
    preds = get_method("copy_retrieved").predict_texts(ex, DataConfig())
    assert preds == [ex[0].profile[1]["reviewText"], ex[1].profile[1]["text"], ""]
    # ... which is select_profile's bm25 top-1 (whatever k and retrieval the experiment itself uses)
    from flythinker.data.retrieval import select_profile

    top = select_profile(ex[0], "product_review", "bm25", k=1)
    assert preds[0] == top[0]["reviewText"]
    assert get_method("copy_retrieved").predict_texts(ex, DataConfig(retrieval="recency", k=0)) == preds


def _tiny_study(tmp_path, tokenizer):
    from flythinker.experiments.synthetic import write_demo_dataset
    from flythinker.testing import tiny_lm

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, num_layers=1, max_positions=512).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    write_demo_dataset(tmp_path / "data", seed=1, n_users_train=2, n_users_test=2, items_per_user=6)
    return ["study", "--data_root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--splits", "user",
            "--methods", "sft,copy_latest,copy_retrieved", "--train_examples", "2", "--eval_examples", "2",
            "--bertscore", "false", "--model.generator", str(gen_dir), "--data.k", "1",
            "--data.profile_tokens", "32", "--data.query_tokens", "16", "--data.target_tokens", "8",
            "--train.batch_size", "2", "--train.grad_accum", "1", "--train.max_steps", "1",
            "--train.progress", "false", "--decode.max_new_tokens", "2", "--decode.batch_size", "2",
            "--ablation.lams", "", "--ablation.reasoner_layers", ""]


@pytest.mark.slow  # the study's evaluation loads WordNet for METEOR: ~1 min on a shared 2-core machine
def test_tiny_study_has_rows_for_both_floors(tmp_path, tokenizer, capsys, monkeypatch):
    from flythinker.cli.main import main
    from flythinker.methods.copy import _Copy

    built = []
    monkeypatch.setattr(_Copy, "build", lambda self, args: built.append(self.name))  # must never be called
    argv = _tiny_study(tmp_path, tokenizer)
    assert main(argv) == 0
    out = tmp_path / "out"
    s = json.loads((out / "summary.json").read_text())["splits"]["user"]
    assert set(s["metrics"]) == {"SFT", "Copy-latest", "Copy-retrieved"} and built == []
    eff = {r["method"]: r for r in s["efficiency"]}
    for name in ("Copy-latest", "Copy-retrieved"):
        assert eff[name]["train_s_per_step"] is None and eff[name]["decode_ms_per_token"] is None
        assert eff[name]["decode_ratio_to_sft"] is None
        lines = [json.loads(x) for x in (out / "user" / name / "predictions.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and all(r["method"] == name and set(r["run"]) == {"checkpoint", "data", "decode"}
                                       for r in lines)
        assert not (out / "user" / name / "train").exists()
    assert eff["SFT"]["decode_ms_per_token"] > 0
    assert set(json.loads((out / "user" / "decode_timing.json").read_text())["ms_per_token"]) == {"SFT"}
    # the floors really copy the history: copy_latest's prediction is the example's newest profile item
    from flythinker.data import load_examples

    dev = {e.id: e for e in load_examples(tmp_path / "data" / "user" / "dev.jsonl")}
    latest = [json.loads(x) for x in (out / "user" / "Copy-latest" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["prediction"] == dev[r["id"]].profile[0]["text"] for r in latest)
    assert "| Copy-retrieved |" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0  # a re-run reuses the floors' predictions (same fingerprints)
    log = capsys.readouterr().out
    assert "[Copy-latest] 0 predictions written (2 reused)" in log
