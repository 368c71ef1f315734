"""`study --only`: run the named rows, report every finished row beside them, skip the unfinished rest; an unknown
name is a one-line error before anything runs."""

import json

from flythinker.cli.main import main
from flythinker.testing import study_yaml


def _config(tmp_path, gen_dir, only: list[str]) -> str:
    return study_yaml(tmp_path / "study.yaml", tmp_path / "data", tmp_path / "out", gen_dir, only=only,
                      methods=["copy_latest", "copy_retrieved", "sft"], variants=[{"name": "RAG-k1", "method": "rag"}],
                      ablation={"lams": [0.2], "reasoner_layers": []})


def test_only_runs_the_named_rows_and_reports_the_finished_ones(tmp_path, tokenizer, capsys):
    from flythinker.experiments.synthetic import write_demo_dataset
    from flythinker.testing import tiny_lm

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, num_layers=1, max_positions=512).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    write_demo_dataset(tmp_path / "data", seed=1, n_users_train=2, n_users_test=2, items_per_user=6)
    out = tmp_path / "out"

    def reported() -> set:
        return set(json.loads((out / "summary.json").read_text())["splits"]["user"]["metrics"])

    assert main(["study", "--config", _config(tmp_path, gen_dir, ["Copy-latest", "SFT"])]) == 0
    log = capsys.readouterr().out
    assert reported() == {"Copy-latest", "SFT"}
    assert "[Copy-retrieved] not in `only`" in log and "[RAG-k1] not in `only`" in log
    assert not (out / "user" / "Copy-retrieved").exists() and not (out / "user" / "RAG-k1").exists()
    assert "ablations skipped" in log and not (out / "ablations").exists()
    sft_model = out / "user" / "SFT" / "train" / "final" / "flythinker.json"
    stamp = sft_model.stat().st_mtime_ns

    # the next row alone: the finished ones are reported beside it (SFT reused, not retrained: the CIs' baseline)
    assert main(["study", "--config", _config(tmp_path, gen_dir, ["RAG-k1"])]) == 0
    log = capsys.readouterr().out
    assert reported() == {"Copy-latest", "SFT", "RAG-k1"}
    assert "[SFT] reusing trained model" in log and "[SFT] training" not in log
    assert sft_model.stat().st_mtime_ns == stamp
    comparisons = json.loads((out / "summary.json").read_text())["splits"]["user"]["comparisons"]
    assert comparisons["baseline"] == "SFT" and set(comparisons["vs_baseline"]) == {"Copy-latest", "RAG-k1"}
    assert "[Copy-retrieved] not in `only`" in log


def test_only_names_an_unknown_row_in_one_line(tmp_path, capsys):
    (tmp_path / "data" / "user").mkdir(parents=True)
    assert main(["study", "--config", _config(tmp_path, "default", ["SFT", "Cocnut"])]) != 0
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["flythinker: error: only: no row named Cocnut; the rows are Copy-latest, "
                                        "Copy-retrieved, SFT, RAG-k1"]
    assert not (tmp_path / "out").exists()
