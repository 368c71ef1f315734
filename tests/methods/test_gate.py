"""The tanh fusion gate (model.fusion.gate, not in the paper): an untrained gated model is exactly the plain
Generator under every fusion setting, the gate gets a gradient and its own optimizer group, one step moves the
logits, it is saved and loaded with the model, decoding goes through the same gated fusion, and bad values fail."""

import dataclasses
import json

import pytest
import torch

from flythinker import FlyThinker, FlyThinkerConfig
from flythinker.config import ConfigError
from flythinker.decoding.loop import generate
from flythinker.testing import tiny_lm
from flythinker.training.config import TrainArgs
from flythinker.training.optim import param_groups

from ..decoding.test_loop import _assert_teacher_forced, _lm, _prompts

V = 384


def _batch(B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    labels = ids.clone()
    labels[:, : T // 2] = -100
    return ids, mask, labels


def _pair(width_mode=None):
    """(Generator, Reasoner): equal widths, or a narrower Reasoner for the width modes."""
    gen = tiny_lm("llama", seed=1)
    if width_mode is None:
        return gen, tiny_lm("llama", seed=2, num_layers=1)
    return gen, tiny_lm("llama", seed=2, num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1)


SETTINGS = [
    {"gate": "scalar"},
    {"gate": "vector"},
    {"gate": "vector", "scope": "input"},
    {"gate": "scalar", "scope": "output", "rescale": False},
    {"gate": "vector", "normalize": "center"},
    {"gate": "scalar", "normalize": "standardize"},
    {"gate": "vector", "width_mode": "project"},
    {"gate": "scalar", "width_mode": "pad"},
]


def _gated(settings, lam=0.8):
    gen, rea = _pair(settings.get("width_mode"))
    model = FlyThinker(gen, rea, FlyThinkerConfig(lam=lam, **settings))
    if settings.get("normalize", "none") != "none":
        ids, mask, _ = _batch(seed=5)
        model.calibrate([(ids, mask)])
    return model


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_untrained_gate_is_exactly_the_plain_generator(settings):
    model = _gated(settings)
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = FlyThinker(model.generator, None)(ids, mask, labels).logits
        out = model(ids, mask, labels)
        assert out.reasoner_states is not None  # the Reasoner did run: the zero gate, not a skipped path
        assert torch.equal(out.logits, ref)
        model.gate = None  # the same model without its gate is moved by r: the zero gate is what closed it
        assert not torch.allclose(model(ids, mask, labels).logits, ref)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_gate_gets_a_gradient_its_own_group_and_one_step_moves_the_logits(gate):
    model = _gated({"gate": gate})
    ids, mask, labels = _batch()
    assert model.gate.g.shape == (() if gate == "scalar" else (model.generator.config.hidden_size,))
    assert ("gate", model.gate) in model.trainable_parts()
    args = TrainArgs(lr_generator=0.0, lr_reasoner=0.0)  # only the gate moves, so any change of logits is its doing
    groups = [g for g in param_groups(model, args) if g["name"] == "gate"]
    assert len(groups) == 1 and groups[0]["lr"] == args.lr_gate and groups[0]["weight_decay"] == 0.0
    assert groups[0]["params"] == [model.gate.g]
    with torch.no_grad():
        before = model(ids, mask, labels).logits
    model(ids, mask, labels).loss.backward()
    assert model.gate.g.grad is not None and bool((model.gate.g.grad != 0).all())
    opt = torch.optim.AdamW(param_groups(model, args))
    opt.step()
    # Adam's first step moves each coordinate by about lr: the reason lr_gate defaults far above the LMs' rates.
    assert torch.allclose(model.gate.g.detach().abs(), torch.full_like(model.gate.g, args.lr_gate), rtol=0.05)
    with torch.no_grad():
        after = model(ids, mask, labels).logits
    assert not torch.allclose(after, before)


def test_no_gate_without_a_reasoner_or_with_gate_none():
    assert FlyThinker(tiny_lm("llama", seed=1), None, FlyThinkerConfig(gate="vector")).gate is None
    model = FlyThinker(*_pair(), FlyThinkerConfig(gate="none"))
    assert model.gate is None and "gate" not in dict(model.trainable_parts())


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_save_load_round_trip(tmp_path, gate):
    model = _gated({"gate": gate, "width_mode": "project"}).eval()
    with torch.no_grad():
        model.gate.g.copy_(torch.linspace(-0.5, 0.9, model.gate.g.numel()).reshape(model.gate.g.shape))
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "flythinker.json").read_text())
    assert meta["has_gate"] is True and meta["flythinker"]["gate"] == gate
    loaded = FlyThinker.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.gate == gate and torch.equal(loaded.gate.g, model.gate.g)
    ids, mask, labels = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, labels).logits, model(ids, mask, labels).logits)
    with pytest.raises(ValueError, match="gate"):  # the saved gate would be silently dropped
        FlyThinker.from_pretrained(tmp_path / "ckpt", config=dataclasses.replace(model.config, gate="none"))
    other = "vector" if gate == "scalar" else "scalar"
    with pytest.raises(ValueError, match="shape"):
        FlyThinker.from_pretrained(tmp_path / "ckpt", config=dataclasses.replace(model.config, gate=other))


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_gated_greedy_decode_equals_the_forward(gate):
    model = FlyThinker(_lm(1), _lm(2, num_layers=1), FlyThinkerConfig(lam=0.9, gate=gate))
    with torch.no_grad():  # an open gate (the zero init would decode exactly as the plain Generator)
        g = torch.rand(model.gate.g.numel(), generator=torch.Generator().manual_seed(0))
        model.gate.g.copy_((0.3 + g).reshape(model.gate.g.shape))
    ids, mask = _prompts()
    out = generate(model, ids, mask, max_new_tokens=12, eos_token_id=[], concurrent="sequential")
    assert len(set(out[0].tolist())) > 3
    _assert_teacher_forced(model, ids, mask, out)
    plain = generate(FlyThinker(model.generator), ids, mask, max_new_tokens=12, eos_token_id=[])
    assert not torch.equal(out, plain)


def test_bad_gate_is_a_config_error():
    with pytest.raises(ConfigError, match="gate"):
        FlyThinkerConfig(gate="matrix")
    with pytest.raises(ConfigError, match="gate"):
        FlyThinkerConfig.from_dict({"gate": True})


def test_fit_trains_the_gate_at_lr_gate_and_saves_it(tmp_path):
    """Through the trainer: the gate is its own logged group at train.lr_gate, it moves, and final/ keeps it."""
    from flythinker.training.loop import fit

    from ..training.test_loop import _args, _models, make_features

    model = _models(gate="vector")
    args = _args(tmp_path, max_steps=2, save_final=True, lr_gate=0.05)
    fit(model, make_features(2), args, pad_token_id=0)
    moved = model.gate.g.detach()
    assert bool((moved != 0).all()) and float(moved.abs().max()) <= 2 * 0.05 * 1.05  # about lr per Adam step
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(rec.get("lr_gate") == pytest.approx(0.05) for rec in logged)
    loaded = FlyThinker.from_pretrained(tmp_path / "run" / "final")
    assert torch.equal(loaded.gate.g, moved)
