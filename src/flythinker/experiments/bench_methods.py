"""The paper's efficiency comparison across methods (Sec. 4.3, Fig. 3, App. N Table 8), measured in one run:
`flythinker bench train --methods ...` and `flythinker bench decode --methods ...`.

Every registered method is built around the same Generator (and Reasoner, for methods that use one) through the
method registry, fed the same examples, and timed interleaved round-robin (run 1 of every method, then run 2, ...),
reporting medians, so background load hits all methods alike. Training can be timed at several precisions (fp32, bf16
autocast with fp32 master weights), interleaved the same way: one row per method and precision, each ratio to SFT taken
at the same precision. Beside each measured ratio to SFT stands the ratio
Table 8's cost model predicts from N1 (response tokens), N2 (the method's extra sequential steps: reasoning tokens,
latent thoughts, Reasoner steps) and the per-token costs C_G, C_R (`flythinker.flops`).

Memory is a tensor-size accounting (said so in the output, not a measured RSS): parameters, AdamW state (two fp32
moments per trainable parameter), activations saved for backward (the bytes `torch.autograd.graph.saved_tensors_hooks`
sees during one training forward), and KV caches (what one decode of the fixed response length holds at its end,
computed from each model's config); on CUDA it is `torch.cuda.max_memory_allocated` per method instead.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import UserError
from .bench_train import bench_optimizer, precision_autocast


@dataclass
class MethodBench:
    """One method's row."""

    method: str
    precision: str = "fp32"
    train_s_per_step: float | None = None
    train_s_per_epoch: float | None = None
    decode_ms_per_response_token: float | None = None
    decode_s_total: float | None = None
    response_tokens: int = 0
    extra_steps: float = 0.0              # N2 per example: reasoning tokens / latent steps / Reasoner steps
    macs_generator: int = 0
    macs_reasoner: int = 0
    memory: dict[str, int] = field(default_factory=dict)
    memory_kind: str = "tensor accounting"
    train_predicted: float | None = None   # Table 8's training computation, as a ratio to SFT


def _ids(feature: dict[str, Any]) -> list[int]:
    if "input_ids" in feature:
        return list(feature["input_ids"])
    return list(feature["prompt_ids"]) + list(feature.get("response_ids") or [])


def _extra_positions(model: nn.Module, feature: dict[str, Any]) -> int:
    """Positions a method runs beyond the example's tokens in training: Coconut's c latents and two markers, the
    interleaved foil's one thought per k response tokens (read from the model's own settings)."""
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "latents"):
        return int(cfg.latents) + 2
    if hasattr(cfg, "every"):
        n = len(feature.get("response_ids") or [])
        return -(-n // int(cfg.every))
    return 0


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    return model.generator, getattr(model, "reasoner", None)


def _param_bytes(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable)


def kv_cache_bytes(lm: nn.Module, tokens: int, batch: int) -> int:
    """Bytes of a full KV cache of `tokens` positions: 2 (K and V) x layers x kv heads x head dim x dtype size."""
    cfg = lm.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = next(lm.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * heads * head_dim * tokens * batch * size


def predicted_ratio(method: str, n1: float, n2: float, c_g: int, c_r: int) -> float:
    """Table 8's computation column as a ratio to SFT (N1 C_G): CoT, Coconut and the interleaved foil pay
    N2 extra Generator steps, FlyThinker N2 Reasoner steps; methods without extra steps cost what SFT costs."""
    if n1 <= 0:
        return float("nan")
    if method == "flythinker":
        return (n1 * c_g + n2 * c_r) / (n1 * c_g)
    return (n1 * c_g + n2 * c_g) / (n1 * c_g)


def _activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor], precision: str = "fp32") -> int:
    """Bytes of the tensors autograd saves for backward during one training forward (distinct storages) at
    `precision` (bf16 autocast saves bf16 activations)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
            pass
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision_autocast(precision, "cpu"):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss_sum.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _examples(n: int, seed: int):
    from ..data.schema import load_examples
    from .synthetic import make_demo_dataset

    splits = make_demo_dataset(seed=seed, n_users_train=max(2, n), n_users_test=1, items_per_user=6)
    rows = splits["user/train"]
    if len(rows) < n:
        raise UserError(f"bench: could not make {n} examples")
    with tempfile.TemporaryDirectory() as d:  # through the loader, so examples are exactly what a study sees
        p = Path(d) / "ex.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
        return load_examples(p)


def build_models(methods: list[str], generator: nn.Module, reasoner: nn.Module, tokenizer: Any,
                 method_args: Any = None) -> dict[str, Any]:
    """One model per method around the same weights (each method gets its own copy so training one does not
    move another). method_args: a ModelArgs whose method sections (fusion, cot, coconut, interleaved, ...) every
    method is built with (None: the defaults); its generator / reasoner / method fields are not used."""
    import copy
    import dataclasses

    from ..methods import METHODS, ModelArgs, get_method

    base = method_args if method_args is not None else ModelArgs()
    out = {}
    for name in methods:
        m = get_method(name)
        if not m.trained and name not in METHODS:
            raise UserError(f"unknown method {name!r}")
        g = copy.deepcopy(generator)
        r = copy.deepcopy(reasoner) if m.uses_reasoner else None
        out[name] = m.from_lms(g, r, dataclasses.replace(base, method=name if m.trained else "sft"), tokenizer)
    return out


def run_methods_bench(methods: list[str], model_kind: str, what: str, runs: int, n_examples: int,
                      new_tokens: int, threads: int, seed: int = 0, log=print,
                      precision: Sequence[str] = ("fp32",), optimizer_impl: str = "auto",
                      method_args: Any = None) -> dict[str, Any]:
    """Train and/or decode timing of `methods` (what: "train", "decode" or "both"); returns the JSON summary.
    Training steps use the AdamW a training run builds, computed by `optimizer_impl` (`train.optimizer_impl`).

    precision: the training precisions (fp32, bf16), timed interleaved with the methods; one row per method and
    precision. Decoding is timed in fp32 only, so a list other than ["fp32"] needs what="train"."""
    from ..data import DataConfig, collate, encode_example
    from ..methods import get_method
    from ..methods.flythinker.decode import per_token_macs
    from ..methods.flythinker.model import FlyThinker
    from ..training.optim import resolve_optimizer_impl
    from .bench_decode import _load

    precisions = list(precision)
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions) or len(set(precisions)) < len(precisions):
        raise UserError(f"bench: precision must be fp32 and/or bf16, each once; got {','.join(precisions)}")
    if what != "train" and precisions != ["fp32"]:
        raise UserError("bench: a training precision other than fp32 applies to bench train only")
    p0 = precisions[0]
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if "sft" not in methods:
        methods = ["sft", *methods]  # every ratio is to SFT
    for name in methods:
        if getattr(get_method(name), "model_free", False):  # an unknown name also fails here, before any model loads
            raise UserError(f"bench --methods: {name} runs no model, so there is nothing to time")
    generator, reasoner, tokenizer = _load(model_kind)
    if tokenizer is None:
        from ..testing import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        if generator.get_input_embeddings().num_embeddings < len(tokenizer):
            raise UserError(f"bench --methods needs a tokenizer for --model {model_kind}; use tiny or default")
    models = build_models(methods, generator, reasoner, tokenizer, method_args)
    c_g, c_r = per_token_macs(FlyThinker(generator, reasoner))
    # Prompt budgets sized to the model's context, so CoT's reasoning cap and the response still fit on tiny models.
    ctx = getattr(generator.config, "max_position_embeddings", 2048) or 2048
    data = DataConfig(k=2, profile_tokens=min(256, ctx // 4), query_tokens=min(64, ctx // 16),
                      target_tokens=max(8, new_tokens))
    examples = _examples(n_examples, seed)
    keys = [(name, p) for name in methods for p in precisions]
    rows = {(name, p): MethodBench(name, p, macs_generator=c_g, macs_reasoner=c_r if name == "flythinker" else 0)
            for name, p in keys}

    if what in ("train", "both"):
        feats = {name: get_method(name).features(examples, tokenizer, get_method(name).data_config(data))
                 for name in methods}
        batches = {name: [collate([f], tokenizer.pad_token_id, padding_side="right") for f in feats[name]]
                   for name in methods}
        opts = {name: bench_optimizer((p for p in models[name].parameters() if p.requires_grad), 1e-7,
                                      optimizer_impl)
                for name in methods}
        times: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
        log(f"bench train: {len(methods)} methods x {len(precisions)} precisions x {runs} runs x {n_examples} "
            f"examples (interleaved)")
        for r in range(runs + 1):                      # run 0 is the warm-up
            for name, prec in keys:
                model, opt = models[name], opts[name]  # one AdamW per method: its state is fp32 at any precision
                model.train()
                t0 = time.perf_counter()
                for b in batches[name]:
                    with precision_autocast(prec, "cpu"):
                        out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                    (out.loss_sum / out.n_tokens.clamp_min(1)).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if r:
                    times[name, prec].append(time.perf_counter() - t0)
        sft_tokens = sum(len(_ids(f)) for f in feats["sft"])
        for name, prec in keys:
            row = rows[name, prec]
            g_pos = sum(len(_ids(f)) + _extra_positions(models[name], f) for f in feats[name])
            r_pos = sum(len(_ids(f)) for f in feats[name]) if get_method(name).uses_reasoner else 0
            row.train_predicted = (g_pos * c_g + r_pos * c_r) / max(1, sft_tokens * c_g)
            epoch = statistics.median(times[name, prec])
            row.train_s_per_epoch = epoch
            row.train_s_per_step = epoch / len(batches[name])
            b = batches[name][0]
            row.memory.update(
                parameters=_param_bytes(models[name]),
                optimizer=2 * sum(p.numel() * 4 for p in models[name].parameters() if p.requires_grad),
                activations=_activation_bytes(models[name], b, prec))

    if what in ("decode", "both"):
        prompts = [torch.tensor([encode_example(ex, tokenizer, get_method(name).data_config(data),
                                                with_response=False)["prompt_ids"]])
                   for ex in examples[:1] for name in methods]
        times = {name: [] for name in methods}
        n2: dict[str, float] = {}
        log(f"bench decode: {len(methods)} methods x {runs} runs x {new_tokens} response tokens (interleaved)")
        for r in range(runs + 1):
            for name, ids in zip(methods, prompts):
                model = models[name].eval()
                if hasattr(model, "last_generation_extras"):
                    model.last_generation_extras = None
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     eos_token_id=[])
                dt = time.perf_counter() - t0
                if r:
                    times[name].append(dt)
                extras = getattr(model, "last_generation_extras", None) or [{}]
                e = extras[0] or {}
                n2[name] = float(e.get("reasoning_tokens", e.get("latent_steps", e.get("thought_steps", 0))))
                if name == "flythinker":
                    n2[name] = float(out.shape[1])  # one Reasoner step beside every Generator step
                rows[name, p0].response_tokens = int(out.shape[1])
        for name in methods:
            row = rows[name, p0]
            total = statistics.median(times[name])
            row.decode_s_total = total
            row.decode_ms_per_response_token = 1000 * total / max(1, row.response_tokens)
            row.extra_steps = n2.get(name, 0.0)
            lms = [lm for lm in _parts(models[name]) if lm is not None]
            tokens = ids.shape[1] + new_tokens + int(n2.get(name, 0) if name != "flythinker" else 0)
            row.memory["kv_cache"] = sum(kv_cache_bytes(lm, tokens, 1) for lm in lms)
            row.memory.setdefault("parameters", _param_bytes(models[name]))

    table = []
    for name, prec in keys:
        r, sft = rows[name, prec], rows["sft", prec]  # ratios to SFT at the same precision
        n1 = r.response_tokens or new_tokens
        row = {"method": name, "precision": prec, "train_s_per_step": r.train_s_per_step,
               "train_s_per_epoch": r.train_s_per_epoch,
               "decode_ms_per_response_token": r.decode_ms_per_response_token, "decode_s_total": r.decode_s_total,
               "response_tokens": r.response_tokens, "extra_steps_n2": r.extra_steps,
               "memory_bytes": r.memory, "memory_kind": r.memory_kind}
        if r.train_s_per_step and sft.train_s_per_step:
            row["train_ratio_to_sft"] = r.train_s_per_step / sft.train_s_per_step
            row["train_ratio_predicted"] = r.train_predicted
        fp32 = rows.get((name, "fp32"))
        if prec != "fp32" and fp32 is not None and r.train_s_per_step and fp32.train_s_per_step:
            row["train_ratio_to_fp32"] = r.train_s_per_step / fp32.train_s_per_step
        if r.decode_s_total and sft.decode_s_total:
            row["decode_ratio_to_sft"] = r.decode_s_total / sft.decode_s_total
            row["decode_ratio_predicted"] = predicted_ratio(name, n1, r.extra_steps, c_g, c_r)
        table.append(row)
    return {"model": model_kind, "threads": threads, "runs": runs, "examples": n_examples, "new_tokens": new_tokens,
            "macs_generator": c_g, "macs_reasoner": c_r, "device": "cpu", "precisions": precisions,
            "weights_dtype": "float32", "optimizer_impl": resolve_optimizer_impl(optimizer_impl, "cpu"),
            "rows": table}


def print_table(result: dict[str, Any]) -> None:
    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    print(f"methods benchmark: model={result['model']} threads={result['threads']} runs={result['runs']} "
          f"C_G={result['macs_generator'] / 1e6:.1f}M C_R={result['macs_reasoner'] / 1e6:.1f}M MACs/token; "
          f"memory = tensor accounting")
    print(f"{'method':<12}{'prec':<6}{'train s/step':>13}{'x SFT':>7}{'Tab. 8':>8}{'ms/resp tok':>12}{'x SFT':>7}"
          f"{'Tab. 8':>8}{'N2':>6}"
          f"{'params MB':>10}{'optim MB':>9}{'activ MB':>9}{'KV MB':>7}")
    for r in result["rows"]:
        m = r["memory_bytes"]
        def mb(k: str, m: dict[str, int] = m) -> str:
            return f"{m[k] / 2**20:.1f}" if k in m else "-"

        print(f"{r['method']:<12}{r.get('precision', 'fp32'):<6}{f(r['train_s_per_step']):>13}"
              f"{f(r.get('train_ratio_to_sft'), 2):>7}"
              f"{f(r.get('train_ratio_predicted'), 2):>8}"
              f"{f(r['decode_ms_per_response_token'], 1):>12}{f(r.get('decode_ratio_to_sft'), 2):>7}"
              f"{f(r.get('decode_ratio_predicted'), 2):>8}{r['extra_steps_n2']:>6.0f}{mb('parameters'):>10}"
              f"{mb('optimizer'):>9}{mb('activations'):>9}{mb('kv_cache'):>7}")


def plot(result: dict[str, Any], path: str) -> str:
    """Fig. 3 layout: training time per step and decoding time for a fixed response, one bar per method, each
    labelled with its ratio to SFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..safeio import atomic_write_bytes_via

    rows = result["rows"]
    names = [r["method"] for r in rows]
    panels = [(key, ratio, title) for key, ratio, title in (
        ("train_s_per_step", "train_ratio_to_sft", "training (s / step)"),
        ("decode_s_total", "decode_ratio_to_sft", f"decoding ({result['new_tokens']} response tokens, s)"))
        if any(r.get(key) for r in rows)]  # `bench train` measures one panel, `bench decode` the other
    if not panels:
        raise UserError("nothing to plot: the benchmark measured neither training nor decoding")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, ratio, title) in zip(axes[0], panels):
        vals = [r.get(key) or 0 for r in rows]
        bars = ax.bar(names, vals, color=["#999" if n == "sft" else "#c44" if n == "flythinker" else "#48c"
                                          for n in names])
        for b, r in zip(bars, rows):
            if r.get(ratio):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{r[ratio]:.2f}x", ha="center",
                        va="bottom", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    atomic_write_bytes_via(path, lambda p: fig.savefig(p, dpi=120))
    plt.close(fig)
    return path
