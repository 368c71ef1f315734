"""Training checkpoints and the ownership of an out_dir: one HF-style directory per save, written atomically; the
state needed to resume exactly; and the record that says which run an out_dir (and each checkpoint) belongs to.

Layout of `out/step-000100/` (and `out/final/`):
    generator/ reasoner/ flythinker.json fusion.safetensors   <- FlyThinker.save_pretrained (loads for inference)
    training_state.pt                                         <- optimizer, scheduler, RNG, step, data position,
                                                                 the engine and the run identity (step-N only)
    engine/                                                   <- sharded engines only (FSDP, DeepSpeed): each
                                                                 process's shard of weights and optimizer state,
                                                                 written by `accelerator.save_state` (step-N only)
    train_config.json                                         <- the full TrainConfig, human-readable
and `out/run.json` (the identity of the run that owns out_dir), `out/log.jsonl` (the loss log),
`out/.flythinker.lock` (held while a run trains).

Atomicity: a directory is written as `.tmp-<name>`, its files fsynced, and renamed into place, so a kill (or power
loss) never leaves a `step-N` that is half written; pruning renames a step away before deleting it, so a kill
mid-delete never leaves a half `step-N` either. Leftover `.tmp-*` / `.old-*` / `.del-*` are removed by the next run
that owns the directory.

Identity (`run_identity`): the run's settings minus those a resume may change (`config.RESUME_MAY_CHANGE`,
`config.DATA_SOURCE_FIELDS`), a fingerprint of the encoded training features, and the number of processes. A
resume compares it with the checkpoint's and refuses another run's checkpoint naming the keys that differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..safeio import atomic_write_text, exclusive_lock, fingerprint
from ..utils import UserError
from .config import DATA_SOURCE_FIELDS, RESUME_MAY_CHANGE

STATE_NAME = "training_state.pt"
ENGINE_DIR = "engine"
"""Sub-directory of a step-N written by a sharded engine: accelerate's `save_state` output (weights, optimizer state
and RNG of every process), what a resume under the same engine loads with `load_state`."""
CONFIG_NAME = "train_config.json"
RUN_NAME = "run.json"
LOG_NAME = "log.jsonl"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TEMP_PREFIXES = (".tmp-", ".old-", ".del-")
_STATE_KEYS = ("optimizer", "scheduler", "rng", "step", "epoch", "window")


class CheckpointError(Exception):
    """A checkpoint file that cannot be read (truncated, missing, not what it should be): `path` and `reason`."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


# ------------------------------------------------------------------------------------------------------------------
# RNG

def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------------------
# run identity

def data_fingerprint(features: Sequence[dict[str, Any]]) -> str:
    """sha256 (16 hex digits) of the encoded training features in order: the token ids the run trains on, so the
    same data under another path matches and other data (or another tokenizer, template or limit) does not."""
    h = hashlib.sha256(f"{len(features)}\n".encode())
    for f in features:
        for k in sorted(f):
            v = f[k]
            h.update(f"{k}=".encode())
            arr = np.asarray(v) if isinstance(v, (list, tuple)) else None
            if arr is not None and arr.dtype.kind in "iu" and arr.ndim == 1:
                h.update(f"{arr.size}:".encode() + arr.astype("<i8").tobytes())
            else:
                h.update(json.dumps(v, sort_keys=True, default=str).encode())
            h.update(b";")
    return h.hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def run_identity(config: dict[str, Any], train: dict[str, Any], features: Sequence[dict[str, Any]],
                 world_size: int) -> dict[str, Any]:
    """What makes a run this run: `config` (the full settings: model / data / train sections and the data files)
    with the train section replaced by `train` and the fields of RESUME_MAY_CHANGE / DATA_SOURCE_FIELDS left out,
    the data fingerprint and the process count (the data order and RNG streams depend on it).

    Returns {"fingerprint", "config", "data", "examples", "world_size"}; equal fingerprints = the same run."""
    cfg = {k: v for k, v in _jsonable(config).items() if k not in DATA_SOURCE_FIELDS}
    cfg["train"] = {k: v for k, v in _jsonable(train).items() if k not in RESUME_MAY_CHANGE}
    core = {"config": cfg, "data": data_fingerprint(features), "world_size": int(world_size)}
    return {"fingerprint": fingerprint(core), **core, "examples": len(features)}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _short(v: Any) -> str:
    s = "(unset)" if v is _MISSING else json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


_MISSING = object()


def identity_difference(saved: dict[str, Any], current: dict[str, Any],
                        defaults: dict[str, Any] | None = None) -> list[str]:
    """What differs between two run identities, one short "key old -> new" item each ([] = the same run).

    defaults: the default settings, shaped like the config (e.g. {"model": {...}, "train": {...}}); a setting
    may be absent from `saved` because it was added to flythinker after `saved` was written. Such a key, now at its default, is not a difference: a new setting's default
    is the behaviour before it existed, so an old finished run stays reusable by a newer flythinker."""
    if not isinstance(saved, dict):
        return ["run record (not a mapping)"]
    diffs, tolerated = [], False
    a, b = _flatten(saved.get("config", {})), _flatten(current["config"])
    dflt = _flatten(defaults) if defaults else {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
        if va is _MISSING and k in dflt and dflt[k] == vb:
            tolerated = True
            continue
        if va != vb:
            diffs.append(f"{k} {_short(va)} -> {_short(vb)}")
    if saved.get("data") != current["data"]:
        diffs.append(f"training data ({saved.get('examples', '?')} examples, fingerprint {saved.get('data')} -> "
                     f"{current['examples']} examples, fingerprint {current['data']})")
    if saved.get("world_size") != current["world_size"]:
        diffs.append(f"processes {saved.get('world_size')} -> {current['world_size']}")
    if not diffs and not tolerated and saved.get("fingerprint") != current["fingerprint"]:
        diffs.append(f"fingerprint {saved.get('fingerprint')} -> {current['fingerprint']}")
    return diffs


def check_same_run(saved: dict[str, Any] | None, current: dict[str, Any], where: Path, out_dir: Path) -> None:
    """UserError naming the differing keys when `saved` (the identity recorded at `where`) is another run."""
    if saved is None:
        raise UserError(f"train.out_dir {out_dir}: {where} records no run identity (written by an older flythinker "
                        f"or another tool), so it cannot be resumed safely; pass --train.overwrite true to start "
                        f"over or choose another train.out_dir")
    diffs = identity_difference(saved, current)
    if diffs:
        more = f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise UserError(f"train.out_dir {out_dir} holds a different run ({where.name}): {'; '.join(diffs[:6])}{more}"
                        f"; resume continues only the same run (max_steps, epochs and saving/logging may change) "
                        f"-- pass --train.overwrite true to replace it or choose another train.out_dir")


# ------------------------------------------------------------------------------------------------------------------
# out_dir ownership and locking

_HELD: dict[str, int] = {}


@contextlib.contextmanager
def run_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold out_dir's exclusive lock (`out_dir/.flythinker.lock`, created with out_dir) for the block; a second
    process fails at once with a one-line error. Re-entrant within a process, so `flythinker train` can take it
    before loading models and `fit` take it again. Only the main process of a DDP run should call it."""
    out_dir = Path(out_dir)
    key = str(out_dir.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"train.out_dir {out_dir}: cannot create it ({e.strerror})") from None
    with exclusive_lock(out_dir, "train.out_dir"):
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]


def run_artifacts(out_dir: str | Path) -> list[str]:
    """Names of what a training run leaves in out_dir (step-N/, final/, log.jsonl, run.json), sorted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir()
                  if _STEP_RE.match(p.name) or p.name in ("final", LOG_NAME, RUN_NAME))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        # Rename first: a kill mid-delete leaves a `.del-` leftover, never a half directory under a real name.
        if not p.name.startswith(_TEMP_PREFIXES):
            gone = p.with_name(f".del-{p.name}")
            if gone.exists():
                shutil.rmtree(gone, ignore_errors=True)
            os.replace(p, gone)
            p = gone
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _remove_temporaries(out_dir: Path) -> None:
    for p in out_dir.iterdir():
        if p.name.startswith(_TEMP_PREFIXES):
            _remove(p)


def check_fresh_out_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh run (neither resume nor overwrite) into an out_dir that holds another run."""
    if resume or overwrite:
        return
    found = run_artifacts(out_dir)
    if found:
        shown = ", ".join(found[:4]) + (f", ... ({len(found)} entries)" if len(found) > 4 else "")
        raise UserError(f"train.out_dir {out_dir} already holds a training run ({shown}); pass --train.resume true "
                        f"to continue it, --train.overwrite true to delete it and start over, or choose another "
                        f"train.out_dir")


def read_run_record(out_dir: str | Path) -> dict[str, Any] | None:
    """out_dir/run.json (None when absent); a UserError naming the file when it is not a run record."""
    path = Path(out_dir) / RUN_NAME
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable run record ({str(e).splitlines()[0]}); pass --train.overwrite true "
                        f"to start over") from None
    if not isinstance(rec, dict) or "fingerprint" not in rec:
        raise UserError(f"{path}: not a run record (no fingerprint); pass --train.overwrite true to start over")
    return rec


def claim_out_dir(out_dir: str | Path, identity: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Make out_dir this run's, under its lock (main process): overwrite deletes an earlier run's files; a fresh
    run refuses an out_dir holding another run; a resume refuses one whose run.json records another identity.
    Then leftovers of a killed save are removed and run.json records this run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in run_artifacts(out_dir):
            _remove(out_dir / name)
    elif not resume:
        check_fresh_out_dir(out_dir, resume, overwrite)
    else:
        owner = read_run_record(out_dir)
        if owner is not None:
            check_same_run(owner, identity, out_dir / RUN_NAME, out_dir)
        elif found := run_artifacts(out_dir):
            raise UserError(f"train.out_dir {out_dir} holds {', '.join(found[:4])} but no {RUN_NAME} saying which run "
                            f"wrote them (an older flythinker or another tool), so they cannot be resumed safely; "
                            f"pass --train.overwrite true to start over or choose another train.out_dir")
    _remove_temporaries(out_dir)
    atomic_write_text(out_dir / RUN_NAME, json.dumps({"format": 1, **identity}, indent=2, sort_keys=True) + "\n")


def truncate_log(out_dir: str | Path, step: int) -> None:
    """Keep only the loss-log records of steps <= `step` (the position a run starts from; 0 empties the log), so a
    run resumed after a kill between checkpoints does not log the redone steps twice. Unparsable (half-written)
    lines are dropped."""
    path = Path(out_dir) / LOG_NAME
    if not path.exists():
        return
    if step <= 0:
        path.unlink()
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


# ------------------------------------------------------------------------------------------------------------------
# writing

def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk, so the rename that publishes it publishes whole files."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_path(out_dir: str | Path, name: str) -> Path:
    """Where checkpoint `name` is written before it is published under its real name."""
    return Path(out_dir) / f".tmp-{name}"


def begin_checkpoint(out_dir: str | Path, name: str) -> Path:
    """Create the empty temporary directory of checkpoint `name` (removing a leftover one) and return it. Main
    process only; a sharded engine's processes then write their shards under it (`ENGINE_DIR`) before
    `finish_checkpoint` publishes it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(out_dir, name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def save_checkpoint(out_dir: str | Path, name: str, model, training_state: dict[str, Any] | None,
                    config: dict[str, Any]) -> Path:
    """Write `out_dir/name` atomically. `model` is a FlyThinker (unwrapped); returns the final path."""
    begin_checkpoint(out_dir, name)
    return finish_checkpoint(out_dir, name, model, training_state, config)


def finish_checkpoint(out_dir: str | Path, name: str, model, training_state: dict[str, Any] | None,
                      config: dict[str, Any]) -> Path:
    """Write the model (HF layout, through its own `save_pretrained`), the training state and the config into the
    temporary directory made by `begin_checkpoint`, flush it to disk and rename it to `out_dir/name` (replacing an
    existing one without a moment where neither exists). Main process only; returns the final path."""
    out_dir = Path(out_dir)
    final = out_dir / name
    tmp = temporary_path(out_dir, name)
    model.save_pretrained(tmp)
    if training_state is not None:
        torch.save(training_state, tmp / STATE_NAME)
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. final/): swap via a second rename so it is never missing
        old = out_dir / f".old-{name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(out_dir)
    return final


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Keep only the newest `keep` step directories (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for _, p in step_checkpoints(out_dir)[keep:]:
        _remove(p)


def remove_checkpoints_after(out_dir: str | Path, step: int) -> list[Path]:
    """Delete the step directories numbered above `step` (the unreadable ones a resume skipped: this run would
    overwrite them anyway, and pruning must not keep them over good ones). Returns what was removed."""
    gone = [p for n, p in step_checkpoints(out_dir) if n > step]
    for p in gone:
        _remove(p)
    return gone


# ------------------------------------------------------------------------------------------------------------------
# reading

def step_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `step-N` directory of out_dir as (N, path), newest first (temporary directories are ignored)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The `step-N` directory with a training state and the largest N, or None (not checked for corruption:
    `fit` does that when it resumes)."""
    return next((p for _, p in step_checkpoints(out_dir) if (p / STATE_NAME).is_file()), None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 120 else line[:117] + "..."


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The training state of checkpoint `path`; a CheckpointError naming the file when it is missing, truncated or
    not a training state."""
    file = Path(path) / STATE_NAME
    if not file.is_file():
        raise CheckpointError(file, "missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- truncated zip, bad pickle, I/O: the file is unusable either way
        raise CheckpointError(file, f"truncated or corrupt: {_first_line(e)}") from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise CheckpointError(file, "not a training state (keys missing)")
    return state


def check_checkpoint_files(path: str | Path) -> None:
    """Check that checkpoint `path` is whole before anything is loaded from it: flythinker.json is a FlyThinker
    record, generator/ exists (and reasoner/ when recorded) and every *.safetensors has an intact header covering
    the whole file. A CheckpointError names the first bad file."""
    from safetensors import safe_open

    path = Path(path)
    meta_file = path / "flythinker.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(meta_file, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(meta_file, f"not valid JSON: {_first_line(e)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("flythinker"), dict):
        raise CheckpointError(meta_file, "no 'flythinker' section")
    for sub in ("generator",) + (("reasoner",) if meta.get("has_reasoner") else ()):
        if not (path / sub).is_dir():
            raise CheckpointError(path / sub, "missing directory")
        if not any((path / sub).glob("*.safetensors")) and not any((path / sub).glob("*.bin")):
            raise CheckpointError(path / sub, "no weight files")
    for file in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 -- SafetensorError, OSError: truncated or not a safetensors file
            raise CheckpointError(file, f"truncated or corrupt: {_first_line(e)}") from None


def check_engine_files(path: str | Path) -> None:
    """A step-N of a sharded engine must hold `ENGINE_DIR` with files in it, else a CheckpointError naming it. What
    is inside is accelerate's format (`load_state` reads it and fails loudly on a damaged shard)."""
    engine = Path(path) / ENGINE_DIR
    if not engine.is_dir():
        raise CheckpointError(engine, "missing (the sharded engine state)")
    if not any(p.is_file() for p in engine.rglob("*")):
        raise CheckpointError(engine, "empty (the sharded engine state)")
