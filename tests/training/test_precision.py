"""Training precision: accelerate's bf16 mixed precision really autocasts on CPU and keeps fp32 master weights and
optimizer state, and `fit`'s precision "auto" follows `utils.native_bf16` (FLYTHINKER_NATIVE_BF16 here), switching
between fp32 and bf16 runs in one process."""

import math

import pytest
import torch
from torch import nn

from flythinker import FlyThinker
from flythinker.testing import tiny_lm
from flythinker.training.config import TrainArgs
from flythinker.training.loop import _allow_precision, fit


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate's state is process-wide: leave none behind for other tests (and start from none)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _model():
    return FlyThinker(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1))


def _batch(B=2, T=10, V=300):
    ids = torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : T // 2] = -100
    return ids, torch.ones_like(ids), labels


def _linear_out_dtypes(model: nn.Module) -> list[torch.dtype]:
    """Record the output dtype of the Generator's first Linear on every call (a forward hook)."""
    seen: list[torch.dtype] = []
    lin = next(m for m in model.generator.modules() if isinstance(m, nn.Linear))
    lin.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


def test_accelerate_bf16_on_cpu_autocasts_with_fp32_master_weights_and_optimizer_state():
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16", cpu=True)
    assert acc.native_amp  # accelerate turns bf16 autocast on for CPU without asking the hardware
    model = _model()
    seen = _linear_out_dtypes(model)
    wrapped = acc.prepare(model)  # as fit does: only the model, the optimizer is plain AdamW
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids, mask, labels = _batch()
    with acc.autocast():
        out = wrapped(ids, attention_mask=mask, labels=labels)
        loss = out.loss_sum / out.n_tokens
    acc.backward(loss)
    assert seen and seen[0] == torch.bfloat16  # the matmuls ran in bf16
    assert loss.dtype == torch.float32 and math.isfinite(float(loss.detach()))  # the NLL is taken from fp32 logits
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    states = [s for s in opt.state.values() if s]
    assert states and all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
                          for s in states)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


def _features(n=4, V=300):
    g = torch.Generator().manual_seed(1)
    return [{"prompt_ids": torch.randint(3, V, (5,), generator=g).tolist(),
             "response_ids": torch.randint(3, V, (4,), generator=g).tolist() + [2]} for _ in range(n)]


def _fit(tmp_path, name, precision="auto"):
    model = _model()
    seen = _linear_out_dtypes(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainArgs(out_dir=str(tmp_path / name), batch_size=2, grad_accum=1, max_steps=2, lr_generator=1e-2,
                     lr_reasoner=1e-2, warmup_ratio=0.0, schedule="constant", progress=False, save_final=False,
                     precision=precision)
    res = fit(model, _features(), args, pad_token_id=0)
    moved = any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    return model, seen, res, moved


def test_fit_precision_auto_follows_native_bf16_and_switches_in_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYTHINKER_NATIVE_BF16", "0")
    model, seen, res, _ = _fit(tmp_path, "fp32")
    assert set(seen) == {torch.float32} and len(res.losses) == 2
    monkeypatch.setenv("FLYTHINKER_NATIVE_BF16", "1")
    # a second fit in this process with another precision: accelerate's fixed state is dropped, not an error
    model, seen, res, moved = _fit(tmp_path, "bf16")
    assert set(seen) == {torch.bfloat16}
    assert all(math.isfinite(x) for x in res.losses) and len(res.losses) == 2
    assert all(p.dtype == torch.float32 for p in model.parameters()) and moved
    monkeypatch.setenv("FLYTHINKER_NATIVE_BF16", "1")
    _, seen, _, _ = _fit(tmp_path, "pinned", precision="fp32")  # an explicit fp32 ignores the hardware
    assert set(seen) == {torch.float32}


def test_allow_precision_only_drops_a_different_state():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    Accelerator(mixed_precision="no", cpu=True)
    _allow_precision("no")
    assert AcceleratorState._shared_state.get("_mixed_precision") == "no"  # same precision: kept
    _allow_precision("bf16")
    assert not AcceleratorState._shared_state
    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
