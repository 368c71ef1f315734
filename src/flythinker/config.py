"""The one configuration mechanism every verb uses: typed dataclasses <-> YAML <-> dotted flags.

Each verb's options are one (possibly nested) dataclass. `add_dataclass_args` turns it into argparse flags
(`--train.lr 1e-4`), `build_config` layers defaults < YAML file < flags, and unknown YAML keys are an error
that names the key, so a typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


# ----------------------------------------------------------------------------------------------------------------
# dataclass <-> dict / YAML / argparse


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _resolved_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/flag value to the annotated type, or raise a ConfigError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        last: Exception | None = None
        for a in inner:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = _flow_list(value, where)  # a flag holding a YAML list, e.g. --variants '[{name: A, ...}]'
        elif isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_t = args[0] if args else Any
        out = [_coerce(v, item_t, where) for v in value]
        return tuple(out) if origin is tuple else out
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is float and not math.isfinite(out):  # nan / inf parse as floats and poison a whole run
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return out
    if tp is str:
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return value
    return value


def _flow_list(text: str, where: str) -> list:
    """A flag's value written as a YAML flow sequence (`[a, b]`, `[{name: X, overrides: {...}}]`)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML list ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {text!r}")
    return value


def from_dict(cls: type, d: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a (nested) dict; unknown keys raise a ConfigError naming them."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    known = {f.name: tp for f, tp in _resolved_fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    kwargs = {k: _coerce(v, known[k], f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; one-line errors for a missing, binary, non-UTF-8 or malformed file."""
    import yaml

    from .safeio import read_text

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    text = read_text(p, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid YAML (nested too deeply)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{p}: keys must be names; got {bad[0]!r}")
    return data


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one `--a.b` flag per (nested) dataclass field; defaults stay unset so YAML values can win."""
    for f, tp in _resolved_fields(cls):
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            add_dataclass_args(parser, tp, prefix=f"{name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        doc = _field_doc(cls, f.name)
        flags = [f"--{name}"]
        if "_" in f.name:  # --train.lr_generator and --train.lr-generator both work
            flags.append(f"--{prefix}{f.name.replace('_', '-')}")
        parser.add_argument(
            *flags, dest=name, default=argparse.SUPPRESS, metavar=f.name.upper(),
            help=f"{doc} (default: {default!r})" if doc else f"(default: {default!r})",
        )


def _field_doc(cls: type, name: str) -> str:
    """Attribute docstrings (the string literal after a field), read from source for --help."""
    import ast
    import inspect

    cache = _DOC_CACHE.setdefault(cls, {})
    if not cache:
        try:
            tree = ast.parse(inspect.getsource(cls))
        except (OSError, TypeError, SyntaxError):
            return ""
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(getattr(b, "value", None), ast.Constant) and isinstance(b.value.value, str):
                cache[a.target.id] = " ".join(b.value.value.split())
        cache.setdefault("__parsed__", "")
    return cache.get(name, "")


_DOC_CACHE: dict[type, dict[str, str]] = {}


def _set_nested(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def build_config(cls: type, args: argparse.Namespace, config_path: str | None = None, base: Any = None) -> Any:
    """defaults (or the dataclass instance `base`, e.g. a preset) < YAML (`config_path`) < flags, merged key by key
    so each layer overrides exactly what it names. Flags are the dotted names `add_dataclass_args` created."""
    data: dict[str, Any] = to_dict(base) if base is not None else {}
    if config_path:
        _merge(data, load_yaml(config_path))
    field_names = _flag_names(cls)
    for name, value in vars(args).items():
        if name in field_names:
            _set_nested(data, name, value)
    return from_dict(cls, data, where=str(config_path) if config_path else "flags")


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _flag_names(cls: type, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for f, tp in _resolved_fields(cls):
        if _is_dataclass_type(tp):
            out |= _flag_names(tp, f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


def apply_overrides(obj: Any, overrides: dict[str, Any], where: str = "overrides") -> Any:
    """A copy of dataclass `obj` with dotted-key `overrides` applied ({"fusion.lam": 0.2}), coerced and checked as
    a YAML value would be; an unknown key is a ConfigError naming it."""
    data = to_dict(obj)
    for dotted, value in overrides.items():
        node, parts = data, dotted.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"{where}: unknown key {dotted!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"{where}: unknown key {dotted!r}")
        node[parts[-1]] = value
    return from_dict(type(obj), data, where=where)


def dump_json(obj: Any) -> str:
    return json.dumps(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, indent=2, sort_keys=True)


__all__ = ["ConfigError", "add_dataclass_args", "apply_overrides", "build_config", "dump_json", "from_dict", "load_yaml", "to_dict"]
