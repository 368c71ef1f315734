"""`flythinker study`: the paper's comparison on real held-out users, from one config to one results folder.

Owns the study configuration and its flow: for each split (user, temporal) run every method (Non-personalized,
RAG, SFT, FlyThinker, or any registered method) through `runner.run_method` with the same prompts, decoding and seed
and an equal training budget for the trained ones; score them (`evaluation.report.run_evaluation`: metric table,
paired bootstrap CIs of
FlyThinker - SFT, position-sensitive plot and table); record training s/step and decode ms/token as ratios to SFT;
then the reduced-budget ablations (lists of override points: λ, Reasoner depth, ...) scored by metrics and by
teacher-forced dev NLL.
Everything lands in `out/` with a summary.json and summary.md; every stage is cached/resumable.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, to_dict
from ..data import DataConfig
from ..decoding.sampling import DecodeConfig
from ..methods import METHODS
from ..methods.base import ModelArgs
from ..methods.flythinker.config import Normalize, Scope
from ..safeio import atomic_write_text
from ..training.config import TrainArgs
from ..utils import UserError

if typing.TYPE_CHECKING:
    from .runner import MethodSpec

DEFAULT_METHODS = ("nonpersonalized", "rag", "sft", "flythinker")


@dataclass
class Variant:
    """A named row with dotted overrides of the study's settings: an extra row of the main comparison (a candidate
    fix under test gets the full evaluation: metrics, CIs against SFT, segments, efficiency) or an ablation point."""

    name: str
    """Display name (table row and folder name); must differ from the other rows' names."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted settings over the study's model / data / train / decode sections, e.g.
    {model.fusion.normalize: standardize} or {decode.copy_bonus: 2}."""
    method: str = ""
    """The registered method the row runs (empty: flythinker, or the model_from row's method)."""
    model_from: str = ""
    """A row listed before this one (a method's display name or a variant's name; for an ablation point, an earlier
    point or SFT, the reference) whose trained model this row decodes instead of training its own: the row takes
    that row's method and settings, and its own overrides may only be decode.* ones. {name: SFT+copy, model_from: SFT, overrides: {decode.copy_bonus: 2}} measures a decoding
    lever on the very SFT model it is compared with, at the cost of one more decode and no training."""

    def spec(self, source=None, where: str = "variants"):
        """This row's MethodSpec; `source` is the MethodSpec of its model_from row (required when it has one);
        `where` names the config section in errors (variants, or ablation.points)."""
        from .runner import MethodSpec

        if not self.model_from:
            return MethodSpec(self.name, self.method or "flythinker", dict(self.overrides))
        own = [k for k in self.overrides if not k.startswith("decode.")]
        if own:
            raise UserError(f"{where}: {self.name} decodes the model of {self.model_from} (model_from), so only "
                            f"decode.* overrides can be its own; got {', '.join(own)}")
        if source is None:
            raise UserError(f"{where}: {self.name}: model_from {self.model_from!r} is not a row listed before it")
        if self.method and self.method != source.method:
            raise UserError(f"{where}: {self.name} runs {self.method} but decodes the model of {self.model_from}, "
                            f"a {source.method} row; drop its method (it is taken from {self.model_from})")
        if not source.trained or source.model_from:
            raise UserError(f"{where}: {self.name}: model_from {self.model_from!r} must be a row that trains its "
                            f"own model")
        inherited = {k: v for k, v in source.overrides.items() if not k.startswith("decode.")}
        return MethodSpec(self.name, source.method, {**inherited, **self.overrides}, model_from=self.model_from)


@dataclass
class AblationConfig:
    """Reduced-budget ablations on one split (paper Figures 5-6, Table 4): a list of override points, plus axis
    shortcuts that expand to points (lams: [0.2] is the point {name: lam=0.2, overrides: {model.fusion.lam: 0.2}})."""

    split: str = "user"
    lams: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.5, 1.0, 2.0, 5.0])
    """λ values (Figure 6); empty disables."""
    reasoner_layers: list[int] = field(default_factory=lambda: [4, 8])
    """Reasoner depths, as first-k-layer cuts of the Generator (Figure 5); the Generator's depth (30 for SmolLM2)
    is a full copy of it, a deeper value is an error before any model loads; empty disables."""
    history_k: list[int] = field(default_factory=list)
    """History lengths (App. J, Table 4), each k >= 1. Each k is two points, `k=K` (FlyThinker) and `SFT k=K` (k
    changes every method's prompt, so each k has its own SFT reference), with data.k = K and the profile budget
    grown with k: data.profile_tokens = round(K x the study's data.profile_tokens / the study's data.k), the same
    share per item; empty disables."""
    normalize: list[str] = field(default_factory=list)
    """FlyThinkerConfig.normalize variants (center, standardize) at the experiment's λ; not in the paper."""
    scopes: list[Scope] = field(default_factory=list)
    """Fusion scopes other than the experiment's (input, output: the paper's Table 3 ablation); empty disables."""
    lr_reasoners: list[float] = field(default_factory=list)
    """Reasoner learning rates other than train.lr_reasoner (the Generator's stays); empty disables."""
    points: list[Variant] = field(default_factory=list)
    """Further ablation points, each a name and dotted overrides; a point with model_from (an earlier point, or
    SFT, the reference) decodes that point's trained model with its own decode.* overrides instead of training."""
    train_examples: int = 120
    eval_examples: int = 24
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        valid = [m for m in typing.get_args(Normalize) if m != "none"]
        bad = [m for m in self.normalize if m not in valid]
        if bad:
            raise UserError(f"ablation.normalize: unknown variant(s) {', '.join(bad)}; valid: {', '.join(valid)}")
        for name in ("reasoner_layers", "history_k"):
            values = getattr(self, name)
            if any(v < 1 for v in values):
                raise ConfigError(f"ablation.{name}: every value must be >= 1; got {values}")
            if len(set(values)) < len(values):
                raise ConfigError(f"ablation.{name}: a value is listed twice; got {values}")

    def all_points(self, data: DataConfig | None = None) -> list[tuple[str, Any, Variant]]:
        """(axis, value, point) for every ablation point, then the SFT reference point. data: the study's data
        settings, which the history_k points scale (the default DataConfig when None)."""
        pts = [("lam", v, Variant(f"lam={v:g}", {"model.fusion.lam": v})) for v in self.lams]
        pts += [("reasoner_layers", k, Variant(f"layers={k}", {"model.reasoner": str(k)}))
                for k in self.reasoner_layers]
        for k in self.history_k:
            over = {"data.k": k, "data.profile_tokens": history_profile_tokens(k, data or DataConfig())}
            pts += [("history_k", k, Variant(f"k={k}", over)),
                    ("history_k_sft", k, Variant(f"SFT k={k}", dict(over), method="sft"))]
        pts += [("normalize", m, Variant(f"normalize={m}", {"model.fusion.normalize": m})) for m in self.normalize]
        pts += [("scope", sc, Variant(f"scope={sc}", {"model.fusion.scope": sc})) for sc in self.scopes]
        pts += [("lr_reasoner", lr, Variant(f"lr_reasoner={lr:g}", {"train.lr_reasoner": lr}))
                for lr in self.lr_reasoners]
        pts += [("point", p.name, p) for p in self.points]
        if pts:
            pts.append(("sft", None, Variant("SFT", method="sft")))
        return pts

    def specs(self, data: DataConfig | None = None) -> list[tuple[str, Any, MethodSpec]]:
        """(axis, value, MethodSpec) for every point in run order: the SFT reference first (a point with its setting,
        e.g. "SFT k=2" at k = 2, then reuses it, and the comparisons' baseline keeps its name), then the rest as
        listed. A point with model_from decodes an earlier point's trained model (SFT, the reference, included)
        with its own decode.* overrides: a decoding lever costs one decode on the tune pool, not a retraining."""
        pts = sorted(self.all_points(data), key=lambda t: t[0] != "sft")
        specs: list[tuple[str, Any, MethodSpec]] = []
        for axis, value, p in pts:
            source = next((s for _, _, s in specs if s.name == p.model_from), None) if p.model_from else None
            specs.append((axis, value, p.spec(source, where="ablation.points")))
        return specs


def history_profile_tokens(k: int, data: DataConfig) -> int:
    """The profile budget of a k-item history point: the study's per-item share (data.profile_tokens / data.k)
    times k, rounded, so a longer history gets proportionally more tokens rather than thinner items."""
    if data.k < 1:
        raise ConfigError(f"ablation.history_k: the study's data.k must be >= 1 to scale data.profile_tokens per "
                          f"item; got data.k = {data.k}")
    return max(1, round(k * data.profile_tokens / data.k))


@dataclass
class StudyConfig:
    """`flythinker study` configuration (see configs/commits_study.yaml)."""

    data_root: str = "../shared/data/commits"
    """Folder with <split>/train.jsonl[.gz] and <split>/dev.jsonl."""
    out: str = "results/commits"
    splits: list[str] = field(default_factory=lambda: ["user", "temporal"])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Registered methods to compare (flythinker.methods.METHODS), each with the study's settings."""
    variants: list[Variant] = field(default_factory=list)
    """Extra rows with overridden settings (see Variant); empty by default."""
    only: list[str] = field(default_factory=list)
    """Row names (display names, e.g. SFT, Coconut, CoS) to train and decode this time; empty: every row. A row
    not named is still reported when its folder holds a finished run (all its predictions, and its trained model
    if it has one), and is skipped otherwise, so one added row gets its figures beside the finished ones without
    the unfinished rest running first. The ablations do not run while `only` is set."""
    train_examples: int = 400
    """Training examples per split (first N of a seeded shuffle of train)."""
    eval_examples: int = 100
    """Reported dev examples per split: N of a seeded shuffle of dev, after the tune_examples."""
    tune_examples: int = 0
    """Dev examples per split held out for choosing settings: the first N of the seeded shuffle. The ablations
    score on these only and the reported comparison never sees them, so a setting picked on the ablations is judged
    on examples it was not picked on (0: no held-out pool; the ablations then score on the first of the reported
    examples, as studies before this field did)."""
    seed: int = 0
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainArgs = field(default_factory=TrainArgs)
    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(max_new_tokens=512, seed=0))
    reasoner_device: str = ""
    """Device of the Reasoner while decoding, e.g. cuda:1 (the paper's two-GPU setting, with --decode.backend auto
    or two_devices) or cpu; empty: the Generator's. Training is unaffected; one-model rows ignore it."""
    bertscore: bool = True
    ablation: AblationConfig = field(default_factory=AblationConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tune_examples, bool) or not isinstance(self.tune_examples, int) or self.tune_examples < 0:
            raise UserError(f"tune_examples must be an integer >= 0; got {self.tune_examples!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise UserError(f"unknown method(s) {', '.join(bad)}; valid: {', '.join(METHODS)}")
        if self.reasoner_device:
            from ..decoding.concurrency import check_device

            check_device(self.reasoner_device, "reasoner_device")  # a ConfigError: one line, before any model loads
        for spec in self.rows() + [spec for _, _, spec in self.ablation.specs(self.data)]:
            # checks the method and every override key now, not hours into the run
            spec.model_args(self.model), spec.data_config(self.data), spec.train_args(self.train)
            spec.decode_config(self.decode)
        points = [p.name for _, _, p in self.ablation.all_points(self.data)]  # the axes' budgets are checked here
        dup = sorted({n for n in points if points.count(n) > 1})
        if dup:  # a point's results folder is keyed by its name: two points of one name would share it
            raise UserError(f"ablation: point name(s) {', '.join(dup)} used twice")
        names = [METHODS[m].display for m in self.methods] + [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"variants: name(s) {', '.join(dup)} used twice (methods are named "
                            f"{', '.join(METHODS[m].display for m in self.methods)})")
        unknown = [n for n in self.only if n not in names]
        if unknown:
            raise UserError(f"only: no row named {', '.join(unknown)}; the rows are {', '.join(names)}")

    def rows(self):
        """The main comparison's MethodSpecs in run order: the methods, then the variants (a model_from variant
        resolved against the row it names, which must come before it)."""
        from .runner import MethodSpec

        specs = [MethodSpec(METHODS[m].display, m) for m in self.methods]
        for v in self.variants:
            specs.append(v.spec(next((s for s in specs if s.name == v.model_from), None) if v.model_from else None))
        return specs


def _finished(spec: MethodSpec, split_dir: Path, ids: Sequence[str]) -> bool:
    """Whether a row's folder holds a finished run: a prediction for each of `ids` (the reported examples; read by
    `predictions.scan_predictions`, which refuses a file that is not a predictions file in one line), and the trained
    model saved when the method trains (run_method then reuses both after checking they are this row's settings)."""
    from ..predictions import scan_predictions
    from .runner import row_folder_name

    folder = split_dir / row_folder_name(spec.name)
    preds = folder / "predictions.jsonl"
    if not preds.is_file():
        return False
    done = set(scan_predictions(preds, method=spec.name).ids)
    return done.issuperset(ids) and (not spec.trained or (spec.trained_dir(split_dir) / "flythinker.json").is_file())


def _split_files(root: Path, split: str) -> tuple[Path, Path]:
    def find(part: str) -> Path:
        for name in (f"{split}/{part}.jsonl", f"{split}/{part}.jsonl.gz"):
            if (root / name).is_file():
                return root / name
        raise UserError(f"{root}/{split}: no {part}.jsonl[.gz]")

    return find("train"), find("dev")


def _sample(examples, n: int, seed: int):
    import random

    rows = list(examples)
    random.Random(seed).shuffle(rows)
    return rows[:n] if n > 0 else rows


def check_plan(cfg: StudyConfig) -> dict[str, tuple[list, list]]:
    """Validate the whole plan before any model loads: data_root, the out folder, every split's train/dev files
    (and the ablation split's when there are ablation points) readable and non-empty. Returns split -> (train, dev)
    samples of the main comparison."""
    from ..data import load_examples
    from ..safeio import check_output_dir

    root = Path(cfg.data_root)
    if not root.is_dir():
        raise UserError(f"data_root {root} is not a directory")
    check_output_dir(cfg.out, "out")
    if not cfg.splits and not cfg.ablation.all_points(cfg.data):
        raise UserError("nothing to run: splits is empty and there are no ablation points")
    check_reasoner_depths(cfg)
    if not cfg.methods and not cfg.variants and cfg.splits:
        raise UserError("nothing to compare: methods and variants are both empty")
    splits = list(dict.fromkeys(cfg.splits + ([cfg.ablation.split] if cfg.ablation.all_points(cfg.data) else [])))
    files = {s: _split_files(root, s) for s in splits}  # a missing split fails here, naming it
    plan = {}
    for split, (train_file, dev_file) in files.items():
        train, dev = load_examples(train_file), load_examples(dev_file)
        if not train or not dev:
            raise UserError(f"{root}/{split}: {'train' if not train else 'dev'} has no examples")
        reported = dev_pools(dev, cfg)[1]
        if not reported:
            raise UserError(f"{root}/{split}: dev has {len(dev)} examples, all of them in the tune_examples "
                            f"({cfg.tune_examples}) pool; nothing is left to report")
        plan[split] = (_sample(train, cfg.train_examples, cfg.seed), reported)
    return {s: plan[s] for s in cfg.splits}


def generator_depth(generator: str) -> int | None:
    """The Generator's layer count from its config alone, no weights: the embedded default's, or a local model
    directory's config.json; None when it cannot be known without loading (a hub id: the load checks it)."""
    from ..default_model import DEFAULT_NUM_LAYERS

    if str(generator).strip().lower() in ("", "default", "auto"):
        return DEFAULT_NUM_LAYERS
    p = Path(str(generator)).expanduser()
    if not (p / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError):  # a folder the model load itself will report, with its own message
        return None
    n = getattr(hf, "num_hidden_layers", None) or getattr(getattr(hf, "text_config", None), "num_hidden_layers", None)
    return int(n) if n else None


def check_reasoner_depths(cfg: StudyConfig) -> None:
    """A Reasoner cut of the Generator is at most all of it (a full copy): a deeper ablation.reasoner_layers value
    is a one-line error now, not when its point comes up after the main comparison has run."""
    if not cfg.ablation.reasoner_layers:
        return
    depth = generator_depth(cfg.model.generator)
    deep = [k for k in cfg.ablation.reasoner_layers if depth is not None and k > depth]
    if deep:
        raise UserError(f"ablation.reasoner_layers: {', '.join(map(str, deep))} exceeds the Generator's depth "
                        f"({depth} layers; {depth} is a full copy of it)")


def dev_pools(dev, cfg: StudyConfig) -> tuple[list, list]:
    """(tune pool, reported examples) of one split's dev: disjoint slices of one seeded shuffle."""
    rows = _sample(dev, 0, cfg.seed)
    tune = rows[: cfg.tune_examples]
    rest = rows[cfg.tune_examples:]
    return tune, (rest[: cfg.eval_examples] if cfg.eval_examples > 0 else rest)


def run_study(cfg: StudyConfig, log=print) -> dict:
    from ..safeio import exclusive_lock
    from ..utils import set_threads

    set_threads(cfg.train.threads or None)
    out = Path(cfg.out)
    plan = check_plan(cfg)  # every split's files, readable and non-empty, before the first model loads
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "study out"):  # two studies on one folder would mix their rows
        return _run_study(cfg, plan, log)


def _run_study(cfg: StudyConfig, plan: dict, log) -> dict:
    from ..evaluation.report import EvalConfig, run_evaluation
    from .runner import efficiency_table, remeasure_decode, run_method

    out = Path(cfg.out)
    atomic_write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2))
    metrics = ("rouge1", "rougeL", "bleu", "meteor") + (("bertscore",) if cfg.bertscore else ())
    tok = _tokenizer(cfg.model)
    summary: dict = {"splits": {}, "ablations": {}, "config": to_dict(cfg)}
    t_start = time.perf_counter()

    for split in cfg.splits:
        train, dev = plan[split]
        log(f"== split {split}: {len(train)} train examples, {len(dev)} dev examples")
        results, specs = [], []
        for spec in cfg.rows():
            if cfg.only and spec.name not in cfg.only and not _finished(spec, out / split, [e.id for e in dev]):
                log(f"[{spec.name}] not in `only` and not finished in {out / split}: skipped")
                continue
            specs.append(spec)
            results.append(run_method(spec, train, dev, cfg.model, cfg.data,
                                      dataclasses.replace(cfg.train, seed=cfg.seed), cfg.decode, out / split,
                                      progress=cfg.train.progress, log=log, reasoner_device=cfg.reasoner_device))
        remeasure_decode(results, specs, cfg.model, cfg.data, dev[0], out / split, tok, log=log,
                         reasoner_device=cfg.reasoner_device, concurrent=cfg.decode.concurrent)
        # the CIs' baseline: SFT when it is a row of this run, else the first row
        base = next((s.name for s in specs if s.method == "sft" and s.name == METHODS["sft"].display),
                    specs[0].name if specs else "")
        rep = run_evaluation([r.predictions for r in results], out / split / "eval",
                             EvalConfig(metrics=metrics, baseline=base, seed=cfg.seed), tokenizer=tok)
        summary["splits"][split] = {"train_examples": len(train), "eval_examples": len(dev),
                                    "metrics": rep.methods, "comparisons": rep.comparisons,
                                    "segments": rep.segments, "efficiency": efficiency_table(results),
                                    "files": rep.files}
        _write(out, summary, metrics)

    if cfg.ablation.all_points(cfg.data) and cfg.only:
        log("ablations skipped: `only` names rows of the main comparison (run without it for the ablations)")
    elif cfg.ablation.all_points(cfg.data):
        summary["ablations"] = run_ablations(cfg, metrics, tok, log)
        _write(out, summary, metrics)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    _write(out, summary, metrics)
    log(f"study written to {out}/summary.md ({summary['seconds']:.0f} s)")
    return summary


def run_ablations(cfg: StudyConfig, metrics, tok, log=print) -> dict:
    """The ablation points (λ, Reasoner depth, history length, ...) on a reduced budget; each point: metrics on a
    few dev examples plus the teacher-forced dev NLL per token (cheap and far less noisy than generation metrics on
    small samples). Then Figures 5 and 6 and Table 4 (`ablation_plots`) into out/ablations/, listed in `files`."""
    from ..data import load_examples
    from ..evaluation.report import EvalConfig, run_evaluation
    from ..training.loop import validate
    from .ablation_plots import write_ablation_figures
    from .runner import load_method_model, run_method

    ab = cfg.ablation
    train_file, dev_file = _split_files(Path(cfg.data_root), ab.split)
    train = _sample(load_examples(train_file), ab.train_examples, cfg.seed)
    all_dev = load_examples(dev_file)
    # With a tune pool the ablations (where settings get chosen) score on it alone, never on reported examples.
    dev = (dev_pools(all_dev, cfg)[0] if cfg.tune_examples > 0 else _sample(all_dev, 0, cfg.seed))[: ab.eval_examples]
    decode = dataclasses.replace(cfg.decode, max_new_tokens=ab.max_new_tokens)
    out = Path(cfg.out) / "ablations"
    rows, seen = [], {}
    for axis, value, spec in ab.specs(cfg.data):
        source = next((r for r in rows if r["name"] == spec.model_from), None) if spec.model_from else None
        if source is not None and "same_as" in source:  # its source was run as another point: that point's model
            spec = dataclasses.replace(spec, model_from=source["same_as"])
        key = _setting_key(spec, cfg)
        if key in seen:  # e.g. lam=0.5 and layers=8 at a λ-0.5, 8-layer experiment: train and decode it once
            first = seen[key]
            log(f"== ablation {spec.name}: the same setting as {first['name']} (reused)")
            rows.append({**first, "axis": axis, "value": value, "name": spec.name, "overrides": spec.overrides,
                         "same_as": first["name"]})
            continue
        log(f"== ablation {spec.name}")
        res = run_method(spec, train, dev, cfg.model, cfg.data, dataclasses.replace(cfg.train, seed=cfg.seed),
                         decode, out, progress=cfg.train.progress, log=log, reasoner_device=cfg.reasoner_device)
        nll_file = res.predictions.parent / "dev_nll.json"
        nlls = json.loads(nll_file.read_text()) if nll_file.is_file() else {}
        if spec.model_free:  # a copy floor has no model, so no NLL: its row has the generation metrics only
            nlls = {"init_dev_nll": None, "dev_nll": None}
        elif source is not None:  # the same trained model as its source, so the same teacher-forced NLLs
            nlls = {"init_dev_nll": source["init_dev_nll"], "dev_nll": source["dev_nll"]}
        elif "init_dev_nll" not in nlls or "dev_nll" not in nlls:
            data_cfg = spec.data_config(cfg.data)
            dev_feats = spec.impl.features(dev, tok, data_cfg, args=spec.model_args(cfg.model))
            # Dev NLL of the UNtrained fused model: how much fusion at this setting perturbs the pretrained
            # Generator before any learning (the gap training has to close first).
            init_model, _ = load_method_model(spec, cfg.model)
            prepare = getattr(init_model, "prepare_training", None)
            if callable(prepare):  # as `fit` does before step 1
                n_cal = cfg.train.calibration_examples
                prepare(spec.impl.features(train[:n_cal], tok, data_cfg, args=spec.model_args(cfg.model)), n_cal,
                        tok.pad_token_id)
            nlls["init_dev_nll"] = validate(init_model, dev_feats, tok.pad_token_id)
            del init_model
            # dev NLL of the trained model (reload final/ so the number is the saved model's)
            model = spec.impl.load(spec.trained_dir(out))
            nlls["dev_nll"] = validate(model, dev_feats, tok.pad_token_id)
            del model
            atomic_write_text(nll_file, json.dumps(nlls, indent=2))
        rows.append({"axis": axis, "value": value, "name": spec.name, "overrides": spec.overrides,
                     "dev_nll": nlls["dev_nll"],
                     "init_dev_nll": nlls["init_dev_nll"], "predictions": str(res.predictions),
                     "train_s_per_step": res.train_s_per_step})
        seen[key] = rows[-1]
    rep = run_evaluation([r["predictions"] for r in rows if "same_as" not in r], out / "eval",
                         EvalConfig(metrics=metrics, baseline="SFT", seed=cfg.seed, segments=None), tokenizer=tok)
    for r in rows:
        r["metrics"] = rep.methods.get(r.get("same_as", r["name"]), {}).get("metrics", {})
    result = {"split": ab.split, "train_examples": len(train), "eval_examples": len(dev), "rows": rows,
              "comparisons": rep.comparisons}
    # Figures 5 and 6 and Table 4 from the rows just scored (an axis with fewer than 2 points has none)
    result["files"] = write_ablation_figures(result, out, metrics)
    return result


def _setting_key(spec: MethodSpec, cfg: StudyConfig) -> str:
    """What decides a point's trained model and predictions: its method and its resolved model, data and training
    settings (names differ; two points with one key are one run). A "default" Reasoner and its layer count spelled
    out resolve differently here, so configs that want the two to meet name the depth (`model.reasoner: "8"`)."""
    settings = {"method": spec.method, "model": to_dict(spec.model_args(cfg.model)),
                "data": to_dict(spec.data_config(cfg.data)), "train": to_dict(spec.train_args(cfg.train)),
                "decode": to_dict(spec.decode_config(cfg.decode))}
    return json.dumps(settings, sort_keys=True, default=str)


def _tokenizer(model: ModelArgs):
    from ..models import load_tokenizer

    return load_tokenizer(model.generator)


def _write(out: Path, summary: dict, metrics) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    atomic_write_text(out / "summary.md", render_summary(summary, metrics))


def render_summary(summary: dict, metrics) -> str:
    def f(v, d=4):
        return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, (int, float)) else str(v))

    lines = ["# Study summary", ""]
    for split, s in summary.get("splits", {}).items():
        # Table 12's "Impr.": mean relative gain over Non-personalized across the metrics, when that row is present
        impr = any(m.get("impr_over_nonpers") is not None for m in s["metrics"].values())
        # BLEU's length terms (evaluate's bleu_length): short outputs lose BLEU through the brevity penalty alone
        blen = any("bleu_length" in m for m in s["metrics"].values())
        lines += [f"## {split} split ({s['train_examples']} train / {s['eval_examples']} dev examples)", "",
                  "| method | " + " | ".join(metrics) + (" | Impr. vs Non-pers" if impr else "")
                  + (" | BLEU len ratio | BLEU BP" if blen else "") + " |",
                  "|---|" + "---|" * (len(metrics) + impr + 2 * blen)]
        for name, m in s["metrics"].items():
            gain = m.get("impr_over_nonpers")
            cell = (" | " + ("-" if gain is None else f"{gain:+.2f}%")) if impr else ""
            if blen:
                bl = m.get("bleu_length") or {}
                cell += f" | {f(bl.get('ratio'), 3)} | {f(bl.get('bp'), 3)}"
            lines.append(f"| {name} | " + " | ".join(f(m["metrics"].get(k)) for k in metrics) + cell + " |")
        lines += ["", "Paired bootstrap 95% CI of each method minus the baseline:", "",
                  "| comparison | metric | diff | 95% CI |", "|---|---|---|---|"]
        comps = s.get("comparisons") or {}
        for name, by_metric in (comps.get("vs_baseline") or {}).items():
            for k, v in by_metric.items():
                if isinstance(v, dict) and "diff" in v:
                    lines.append(f"| {name} - {comps.get('baseline')} | {k} | {f(v['diff'])} | "
                                 f"[{f(v.get('lo'))}, {f(v.get('hi'))}] |")
        lines += ["", "| method | train s/step | x SFT | decode ms/token | x SFT |", "|---|---|---|---|---|"]
        for r in s["efficiency"]:
            lines.append(f"| {r['method']} | {f(r['train_s_per_step'], 2)} | {f(r.get('train_ratio_to_sft'), 2)} | "
                         f"{f(r['decode_ms_per_token'], 1)} | {f(r.get('decode_ratio_to_sft'), 2)} |")
        if s.get("files", {}).get("segments_plot"):
            lines += ["", f"Position-sensitive plot: {s['files']['segments_plot']}"]
        lines.append("")
    ab = summary.get("ablations") or {}
    if ab.get("rows"):
        lines += [f"## Ablations ({ab['split']} split, {ab['train_examples']} train / {ab['eval_examples']} dev)", "",
                  "| setting | dev NLL before training | dev NLL after | " + " | ".join(metrics) + " |",
                  "|---|---|---|" + "---|" * len(metrics)]
        for r in ab["rows"]:
            lines.append(f"| {r['name']} | {f(r.get('init_dev_nll'))} | {f(r['dev_nll'])} | "
                         + " | ".join(f(r['metrics'].get(k)) for k in metrics)
                         + " |")
        if ab.get("files"):  # Figures 5 and 6 and Table 4 (ablation_plots), those whose axis has 2+ points
            lines += ["", "Ablation figures and tables: " + ", ".join(ab["files"].values())]
        lines.append("")
    return "\n".join(lines)
