"""The joint trainer: it learns, updates both models, normalizes by token count, checkpoints atomically, resumes
exactly, supports LoRA/freezing, and gives the same result under a 2-process `accelerate launch`."""

import json

import pytest
import torch

from flythinker import FlyThinker
from flythinker.data.collate import collate
from flythinker.methods import ModelArgs, get_method
from flythinker.methods.flythinker.config import FlyThinkerConfig
from flythinker.testing import tiny_lm
from flythinker.training.checkpoint import latest_checkpoint
from flythinker.training.config import TrainArgs
from flythinker.training.loop import fit, validate
from flythinker.training.optim import lr_lambda


def build_model(generator, reasoner, args, tokenizer=None):
    return get_method(args.method).from_lms(generator, reasoner, args, tokenizer)


def collate_features(features, pad_token_id):
    b = collate(features, pad_token_id, padding_side="right")
    return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}


def make_features(n=6, seed=0, V=384):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i in range(n):
        p = int(torch.randint(4, 9, (1,), generator=g))
        r = int(torch.randint(3, 8, (1,), generator=g))
        ids = torch.randint(3, V, (p + r,), generator=g).tolist()
        feats.append({"prompt_ids": ids[:p], "response_ids": ids[p:] + [2]})
    return feats


def _models(method="flythinker", **kw):
    fusion = {k: kw.pop(k) for k in list(kw) if k in FlyThinkerConfig.__dataclass_fields__}
    args = ModelArgs(method=method, fusion=FlyThinkerConfig(**fusion), **kw)
    return build_model(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1), args)


def _args(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), batch_size=2, grad_accum=1, lr_generator=1e-2, lr_reasoner=1e-2,
                warmup_ratio=0.0, schedule="constant", progress=False, save_final=False)
    base.update(kw)
    return TrainArgs(**base)


def test_collate_masks_prompt_and_pads():
    b = collate_features([{"prompt_ids": [5, 6], "response_ids": [7, 2]}, {"prompt_ids": [5], "response_ids": [2]}], 0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2], [5, 2, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7, 2], [-100, 2, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_steps_lower_loss_and_change_every_parameter_of_both_models(tmp_path):
    model = _models()
    feats = make_features(2)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    assert any(k.startswith("reasoner.") for k in before) and any(k.startswith("generator.") for k in before)
    loss0 = validate(model, feats, 0)
    res = fit(model, feats, _args(tmp_path, max_steps=6), pad_token_id=0)
    assert validate(model, feats, 0) < loss0 - 0.5
    assert res.losses[-1] < res.losses[0]
    unchanged = [k for k, v in model.named_parameters() if v.requires_grad and torch.equal(v, before[k])]
    assert unchanged == []


def test_sft_method_drops_the_reasoner(tmp_path):
    model = _models("sft")
    assert model.reasoner is None
    fit(model, make_features(2), _args(tmp_path, max_steps=1), pad_token_id=0)


def test_token_normalized_accumulation_equals_one_big_batch(tmp_path):
    """4 micro-batches of 1 with accumulation == one batch of 4: same loss and same gradient (norms per model)."""
    feats = make_features(4)
    runs = {}
    for name, bs, acc in (("big", 4, 1), ("accum", 1, 4)):
        res = fit(_models(), feats, _args(tmp_path / name, max_steps=1, batch_size=bs, grad_accum=acc), pad_token_id=0)
        log = json.loads((tmp_path / name / "run" / "log.jsonl").read_text())
        runs[name] = (res.losses[0], log["grad_norm_generator"], log["grad_norm_reasoner"], log["tokens"])
    assert runs["big"] == pytest.approx(runs["accum"], rel=1e-5)
    assert runs["big"][3] == sum(len(f["response_ids"]) for f in feats)


def test_resume_is_exact_and_checkpoints_are_complete(tmp_path):
    feats = make_features(6)
    straight = fit(_models(), feats, _args(tmp_path / "s", max_steps=4, grad_accum=2), pad_token_id=0)
    args = _args(tmp_path / "r", max_steps=2, grad_accum=2, save_every=2, keep_checkpoints=0)
    first = fit(_models(), feats, args, pad_token_id=0)  # stop after 2 steps, as if killed after the save
    ckpt = latest_checkpoint(tmp_path / "r" / "run")
    assert ckpt.name == "step-000002"
    names = {p.name for p in ckpt.iterdir()}
    assert {"generator", "reasoner", "flythinker.json", "training_state.pt", "train_config.json"} <= names
    resumed = TrainArgs(**{**args.__dict__, "max_steps": 4, "resume": True, "save_every": 0})
    second = fit(_models(), feats, resumed, pad_token_id=0)
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "r" / "run").iterdir())
    log = [json.loads(line) for line in (tmp_path / "r" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("lr_generator" in r and "lr_reasoner" in r for r in log)


def test_normalize_is_calibrated_from_the_untrained_reasoner_before_step_one(tmp_path):
    """fit() sets the statistics from the first calibration_examples features with R as it was before training;
    a resumed run recomputes the same values and continues exactly."""
    feats = make_features(6)
    reference = _models(normalize="standardize")
    reference.calibrate([(b["input_ids"], b["attention_mask"]) for b in (collate_features([f], 0) for f in feats[:3])])
    model = _models(normalize="standardize")
    straight = fit(model, feats, _args(tmp_path / "s", max_steps=4, grad_accum=2, calibration_examples=3),
                   pad_token_id=0)
    for k in ("r_mean", "r_std", "r_count"):
        assert torch.equal(getattr(model, k), getattr(reference, k))
    args = _args(tmp_path / "r", max_steps=2, grad_accum=2, save_every=2, calibration_examples=3)
    first = fit(_models(normalize="standardize"), feats, args, pad_token_id=0)
    resumed = TrainArgs(**{**args.__dict__, "max_steps": 4, "resume": True, "save_every": 0})
    second = fit(_models(normalize="standardize"), feats, resumed, pad_token_id=0)
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)


def test_final_checkpoint_loads_with_identical_logits(tmp_path):
    model = _models()
    res = fit(model, make_features(2), _args(tmp_path, max_steps=2, save_final=True), pad_token_id=0)
    loaded = FlyThinker.from_pretrained(res.final_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_freeze_and_lora(tmp_path):
    pytest.importorskip("peft")
    model = _models(freeze_generator=True, lora_reasoner=True)
    g_before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)
    res = fit(model, make_features(2), _args(tmp_path, max_steps=2, save_final=True), pad_token_id=0)
    assert all(torch.equal(v, g_before[k]) for k, v in model.generator.state_dict().items())
    loaded = FlyThinker.from_pretrained(res.final_dir)  # merged LoRA: loads without peft wrappers
    assert not hasattr(loaded.reasoner, "peft_config")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, loaded.eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_lr_schedule_warmup_then_decay():
    f = lr_lambda(TrainArgs(warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1), total_steps=100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1, abs=0.01) and f(50) < f(20)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    feats = make_features(2)
    plain, ckpt = _models(), _models(gradient_checkpointing=True)
    a = fit(plain, feats, _args(tmp_path / "a", max_steps=1), pad_token_id=0)
    b = fit(ckpt, feats, _args(tmp_path / "b", max_steps=1), pad_token_id=0)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    for (k, pa), (_, pb) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=k)


def test_train_cli_end_to_end(tmp_path, tokenizer, capsys):
    """`flythinker train` with YAML + flag overrides on a tiny local Generator, then `--train.resume`."""
    from flythinker.cli.main import main
    from flythinker.experiments.synthetic import write_demo_dataset

    gen_dir = tmp_path / "gen"
    tiny_lm("llama", seed=1, num_layers=2, max_positions=2048).save_pretrained(gen_dir)
    tokenizer.save_pretrained(gen_dir)
    paths = write_demo_dataset(tmp_path / "data", seed=0, n_users_train=2, n_users_test=1, items_per_user=6)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"train_data: {paths['user/train']}\nlimit: 4\nmodel: {{generator: {gen_dir}, reasoner: '1'}}\n"
                   f"data: {{k: 1, profile_tokens: 48, target_tokens: 32}}\n"
                   f"train: {{out_dir: {tmp_path / 'run'}, batch_size: 2, grad_accum: 1, save_every: 1}}\n")
    assert main(["train", "--config", str(cfg), "--train.max_steps", "2", "--train.progress", "false"]) == 0
    final = tmp_path / "run" / "final"
    model = FlyThinker.from_pretrained(final)
    assert model.reasoner is not None and model.reasoner.config.num_hidden_layers == 1
    saved = json.loads((final / "train_config.json").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["data"]["k"] == 1
    assert main(["train", "--config", str(cfg), "--train.max_steps", "3", "--train.resume", "true",
                 "--train.progress", "false"]) == 0
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert main(["train", "--config", str(cfg), "--train.lr_generatr", "1"]) == 2  # argparse's usage error
    capsys.readouterr()
    assert main(["train", "--train_data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
