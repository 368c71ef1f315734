"""`flythinker study` end to end on tiny models and a tiny generated dataset: every method, both splits, CIs,
efficiency ratios, the position-sensitive table and the ablations land in the results folder; a re-run reuses."""

import json

import pytest
import torch

from flythinker.cli.main import main

pytestmark = pytest.mark.integration


def test_study_runs_end_to_end(tmp_path, tokenizer, capsys):
    from flythinker.experiments.synthetic import write_demo_dataset
    from flythinker.testing import study_yaml, tiny_lm

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, num_layers=2, max_positions=2048).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    write_demo_dataset(tmp_path / "data", seed=1, n_users_train=4, n_users_test=3, items_per_user=6)
    cfg = tmp_path / "study.yaml"
    study_yaml(cfg, tmp_path / "data", tmp_path / "out", gen_dir, splits=["user", "temporal"],
               methods=["nonpersonalized", "rag", "sft", "flythinker"], train_examples=4, eval_examples=3,
               model={"generator": str(gen_dir), "reasoner": "1"},
               data={"k": 1, "profile_tokens": 48, "query_tokens": 32, "target_tokens": 32},
               train={"batch_size": 2, "grad_accum": 1, "progress": False, "lr_generator": 1e-3, "lr_reasoner": 1e-3},
               decode={"max_new_tokens": 6, "batch_size": 4},
               ablation={"lams": [2.0], "reasoner_layers": [2], "normalize": ["center"], "scopes": ["output"],
                         "lr_reasoners": [0.0], "train_examples": 2, "eval_examples": 2, "max_new_tokens": 4})
    assert main(["study", "--config", str(cfg), "--train.progress", "false"]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    for split in ("user", "temporal"):
        s = summary["splits"][split]
        assert set(s["metrics"]) == {"Non-personalized", "RAG", "SFT", "FlyThinker"}
        eff = {r["method"]: r for r in s["efficiency"]}
        assert eff["SFT"]["train_ratio_to_sft"] == 1.0 and eff["FlyThinker"]["train_s_per_step"] > 0
        assert eff["RAG"]["train_s_per_step"] is None and eff["RAG"]["decode_ms_per_token"] > 0
        for m in ("SFT", "FlyThinker", "RAG", "Non-personalized"):
            assert len((out / split / m / "predictions.jsonl").read_text().splitlines()) == 3
        # decode timed for all methods together (interleaved), the table's figures are those
        timed = json.loads((out / split / "decode_timing.json").read_text())["ms_per_token"]
        assert {m: eff[m]["decode_ms_per_token"] for m in timed} == timed and len(timed) == 4
    # non-personalized prompts carry no history; RAG prompts do (same Generator, no training)
    names = [r["name"] for r in summary["ablations"]["rows"]]
    # the SFT reference runs first, so a point with its setting reuses it (`same_as`) and the baseline keeps its name
    assert names == ["SFT", "lam=2", "layers=2", "normalize=center", "scope=output", "lr_reasoner=0"]
    assert all(r["dev_nll"] > 0 and r["init_dev_nll"] > 0 for r in summary["ablations"]["rows"])
    cached = json.loads((out / "ablations" / "SFT" / "dev_nll.json").read_text())  # a re-run reuses these
    assert cached["dev_nll"] == next(r["dev_nll"] for r in summary["ablations"]["rows"] if r["name"] == "SFT")
    from flythinker import FlyThinker

    trained = FlyThinker.from_pretrained(out / "ablations" / "normalize_center" / "train" / "final")
    assert trained.config.normalize == "center" and trained.calibrated
    assert FlyThinker.from_pretrained(out / "ablations" / "scope_output" / "train" / "final").config.scope == "output"
    # lr_reasoner 0: the Reasoner's weights stay those of the untrained cut (the Generator's first layer)
    frozen = FlyThinker.from_pretrained(out / "ablations" / "lr_reasoner_0" / "train" / "final")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(gen_dir)
    r_sd, g_sd = frozen.reasoner.state_dict(), base.state_dict()
    assert len(set(r_sd) & set(g_sd)) > 2
    assert all(torch.equal(v, g_sd[k]) for k, v in r_sd.items() if k in g_sd)
    moved = FlyThinker.from_pretrained(out / "ablations" / "lam_2" / "train" / "final").reasoner.state_dict()
    assert not all(torch.equal(v, g_sd[k]) for k, v in moved.items() if k in g_sd)
    md = (out / "summary.md").read_text()
    assert "## user split" in md and "## Ablations" in md and "train s/step" in md

    # Re-run with a variant added: finished methods are reused (not retrained), the variant is trained with its
    # override and gets the full treatment (CI against SFT, decode re-timed with every method).
    sft_weights = (out / "user" / "SFT" / "train" / "final" / "generator" / "model.safetensors").stat().st_mtime_ns
    cfg.write_text(cfg.read_text() + "variants: [{name: FT-std, overrides: {model.fusion.normalize: standardize}}]\n")
    capsys.readouterr()
    assert main(["study", "--config", str(cfg), "--train.progress", "false"]) == 0
    log = capsys.readouterr().out
    assert "[SFT] reusing trained model" in log and "[FlyThinker] reusing trained model" in log
    assert "[FT-std] training on 4 examples" in log
    assert (out / "user" / "SFT" / "train" / "final" / "generator" / "model.safetensors").stat().st_mtime_ns \
        == sft_weights
    summary = json.loads((out / "summary.json").read_text())
    for split in ("user", "temporal"):
        s = summary["splits"][split]
        assert "FT-std" in s["metrics"]
        comps = s["comparisons"]  # compared against SFT (tiny models may write only empty text: then "skipped")
        assert "FT-std" in {**comps["vs_baseline"], **comps.get("skipped", {})}
        assert len(json.loads((out / split / "decode_timing.json").read_text())["ms_per_token"]) == 5
        variant = FlyThinker.from_pretrained(out / split / "FT-std" / "train" / "final")
        assert variant.config.normalize == "standardize" and variant.calibrated
    assert "| FT-std |" in (out / "summary.md").read_text()


def test_study_refuses_to_reuse_a_training_done_with_other_settings(tmp_path, tokenizer, capsys):
    """A re-run whose settings changed must not silently reuse the old trained model or predictions."""
    from flythinker.experiments.synthetic import write_demo_dataset
    from flythinker.testing import tiny_lm

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, num_layers=2, max_positions=2048).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    write_demo_dataset(tmp_path / "data", seed=1, n_users_train=3, n_users_test=2, items_per_user=6)
    base = ["study", "--data_root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--splits", "user",
            "--methods", "sft", "--train_examples", "2", "--eval_examples", "2", "--bertscore", "false",
            "--model.generator", str(gen_dir), "--data.k", "1", "--data.profile_tokens", "32",
            "--data.target_tokens", "16", "--train.batch_size", "2", "--train.grad_accum", "1",
            "--train.progress", "false", "--decode.max_new_tokens", "4", "--ablation.lams", "",
            "--ablation.reasoner_layers", ""]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--train.lr_generator", "1.0e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr_generator" in err[0] and "SFT" in err[0]
    assert main(base + ["--decode.max_new_tokens", "5"]) == 2  # same model, other decoding: predictions refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decode settings changed" in err[0]
    assert main(base) == 0  # the unchanged config still reuses everything
