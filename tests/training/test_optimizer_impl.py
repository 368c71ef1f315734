"""train.optimizer_impl (fused / foreach / for-loop AdamW): the same weights as torch's for-loop AdamW, kept across a
resume without making it another run, refused with a one-line error when bad; the loop's clipping from the norms it
has already taken; and the Reasoner's decoder stack looked up once (`FlyThinker.reasoner_decoder`)."""

import copy
import pickle

import pytest
import torch

import flythinker.methods.flythinker.model as model_module
import flythinker.training.loop as loop_module
from flythinker import FlyThinker
from flythinker.hf import base_model
from flythinker.testing import random_features, tiny_lm
from flythinker.training.checkpoint import run_identity
from flythinker.training.config import TrainArgs
from flythinker.training.loop import _grad_norms, clip_to_norm, fit
from flythinker.training.optim import apply_optimizer_impl, build_optimizer, param_groups, resolve_optimizer_impl
from flythinker.utils import UserError


def _model():
    return FlyThinker(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1))


def _args(out, **kw):
    kw = {"batch_size": 2, "grad_accum": 1, "lr_generator": 1e-2, "lr_reasoner": 1e-2, "warmup_ratio": 0.0,
          "schedule": "constant", "progress": False, "save_final": False, "precision": "fp32", **kw}
    return TrainArgs(out_dir=str(out), **kw)


@pytest.fixture
def built(monkeypatch):
    """The optimizers fit() builds, in order."""
    made = []

    def build(groups, impl):
        made.append(build_optimizer(groups, impl))
        return made[-1]

    monkeypatch.setattr(loop_module, "build_optimizer", build)
    return made


@pytest.mark.parametrize("impl", ["fused", "foreach", "auto"])
def test_impl_gives_the_for_loop_weights_after_three_steps(tmp_path, built, impl):
    feats = random_features(6)
    start = _model()
    runs = {}
    for name in ("for-loop", impl):
        model = copy.deepcopy(start)
        fit(model, feats, _args(tmp_path / name, max_steps=3, max_grad_norm=0.5, optimizer_impl=name), pad_token_id=0)
        runs[name] = dict(model.named_parameters())
    assert built[0].param_groups[0]["fused"] is False and built[0].param_groups[0]["foreach"] is False
    want = {"fused": (True, False), "foreach": (False, True), "auto": (True, False)}[impl]  # auto on CPU: fused
    assert all((g["fused"], g["foreach"]) == want for g in built[1].param_groups)
    moved = [k for k, p in runs[impl].items() if not torch.equal(p, dict(start.named_parameters())[k])]
    assert len(moved) == len(runs[impl])  # every weight moved, so agreeing is not trivial
    for k, p in runs[impl].items():
        torch.testing.assert_close(p, runs["for-loop"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_is_exact_and_keeps_the_chosen_impl(tmp_path, built):
    feats = random_features(6)
    start = _model()
    straight = fit(copy.deepcopy(start), feats, _args(tmp_path / "s", max_steps=4), pad_token_id=0)
    args = _args(tmp_path / "r", max_steps=2, save_every=2, keep_checkpoints=0)
    first = fit(copy.deepcopy(start), feats, args, pad_token_id=0)
    second = fit(copy.deepcopy(start), feats, TrainArgs(**{**args.__dict__, "max_steps": 4, "resume": True}),
                 pad_token_id=0)
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)
    # A run saved under for-loop and resumed under fused is the same run, and then steps fused.
    args = _args(tmp_path / "x", max_steps=2, save_every=2, keep_checkpoints=0, optimizer_impl="for-loop")
    first = fit(copy.deepcopy(start), feats, args, pad_token_id=0)
    second = fit(copy.deepcopy(start), feats, TrainArgs(**{**args.__dict__, "max_steps": 4, "resume": True,
                                                          "optimizer_impl": "fused"}), pad_token_id=0)
    assert all(g["fused"] is True and g["foreach"] is False for g in built[-1].param_groups)
    assert all(s["step"].item() == 4 for s in built[-1].state.values())  # the restored counters went on
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)


def test_impl_is_not_part_of_the_run_identity():
    """A resume may switch it, and a run recorded before the setting existed is the same run."""
    feats = random_features(2)
    ids = [run_identity({}, TrainArgs(optimizer_impl=impl).__dict__, feats, 1)["fingerprint"]
           for impl in ("auto", "fused", "for-loop")]
    older = {k: v for k, v in TrainArgs().__dict__.items() if k != "optimizer_impl"}
    assert len(set(ids)) == 1 and run_identity({}, older, feats, 1)["fingerprint"] == ids[0]


def test_bad_impl_is_a_one_line_error_naming_the_field():
    with pytest.raises(UserError, match=r"^train\.optimizer_impl: must be one of auto, fused, foreach, for-loop; "
                                        r"got 'adam'$"):
        TrainArgs(optimizer_impl="adam")
    with pytest.raises(UserError, match=r"^train\.optimizer_impl: torch has no fused AdamW for meta"):
        resolve_optimizer_impl("fused", "meta")
    assert resolve_optimizer_impl("auto", "cpu") == "fused"
    assert resolve_optimizer_impl("auto", "meta") == "for-loop"


def test_apply_impl_reflags_a_restored_optimizer():
    """load_state_dict takes the saved groups' flags; apply_optimizer_impl sets the chosen ones back and puts the
    step counters where that implementation keeps them."""
    model = _model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    saved = build_optimizer(param_groups(model, TrainArgs()), "for-loop")
    saved.step()
    opt = build_optimizer(param_groups(model, TrainArgs()), "fused")
    opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["fused"] is False
    apply_optimizer_impl(opt, "fused")
    assert all(g["fused"] is True and g["foreach"] is False for g in opt.param_groups)
    assert all(s["step"].dtype == torch.float32 and s["step"].item() == 1 for s in opt.state.values())
    opt.step()
    assert all(s["step"].item() == 2 for s in opt.state.values())


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_clip_to_norm_equals_torch_clip_grad_norm(max_norm):
    torch.manual_seed(0)
    model = _model()
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_([p for p in twin.parameters()], max_norm)
    before = [p.grad.clone() for p in model.parameters()]
    clip_to_norm(model, max_norm, _grad_norms(model, None, sharded=False))
    for p, q, b in zip(model.parameters(), twin.parameters(), before):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)
        if max_norm > 1:  # under the limit: untouched, as torch's multiply by 1.0 leaves them
            assert torch.equal(p.grad, b) and torch.equal(q.grad, b)
    if max_norm < 1:
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert total.item() == pytest.approx(max_norm, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# issue #17: the Reasoner's decoder stack, looked up once


def test_reasoner_decoder_is_looked_up_once_and_follows_the_reasoner(monkeypatch):
    calls = []
    monkeypatch.setattr(model_module, "base_model", lambda lm: calls.append(lm) or base_model(lm))
    model = _model()
    ids = torch.randint(3, 384, (1, 6))
    first, _ = model.reason(ids)
    for _ in range(3):
        assert torch.equal(model.reason(ids)[0], first)
    assert len(calls) == 1
    model.to(torch.float64)  # in place: the stack found before is still the Reasoner's
    assert model.reason(ids)[0].dtype == torch.float64 and len(calls) == 1
    model.to(torch.float32)
    other = tiny_lm("llama", seed=3, num_layers=1)
    model.reasoner = other  # another Reasoner: looked up again, and its states are the new model's
    assert model.reasoner_decoder()[0] is base_model(other) and len(calls) == 2
    assert torch.equal(model.reason(ids)[0], base_model(other)(input_ids=ids).last_hidden_state)
    twin = copy.deepcopy(model)
    assert twin.reasoner_decoder()[0] is base_model(twin.reasoner) is not base_model(other)
    assert "_reasoner_decoder" not in "".join(model.state_dict())
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(restored.reason(ids)[0], model.reason(ids)[0])


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_impl_takes_bf16_weights_as_for_loop_does(impl):
    """model.dtype bf16 keeps weights and AdamW state in bf16: the fused / foreach update agrees with the for-loop
    one to bf16 rounding (a few units in the last place: the for-loop rounds after every operation, fused once)."""
    w0 = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = {}
    for name in ("for-loop", impl):
        p = torch.nn.Parameter(w0.clone())
        opt = build_optimizer([{"params": [p], "lr": 1e-2, "weight_decay": 0.025}], name)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=g).bfloat16()
            opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        out[name] = p.detach()
    assert not torch.equal(out[impl], w0)
    torch.testing.assert_close(out[impl], out["for-loop"], rtol=4 * 2 ** -7, atol=5e-4)
