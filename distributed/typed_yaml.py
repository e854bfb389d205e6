"""Typed dataclasses from YAML: unknown keys and wrong types fail with the dotted path of the key.

Every config section in the project is a plain dataclass owned by the component that uses it; this
module is the one place that turns nested mappings (YAML, `--set` overrides) into those dataclasses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Literal, Union

import yaml

from selfexplain.groundtruth.errors import ConfigError


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursively; reject unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{_join(path, str(key))}: unknown key (accepted here: {', '.join(sorted(fields))})"
            )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = coerce(hints[name], data[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ValueError as err:  # sections raise ValueError("key: why"); anchor it at their path
            raise ConfigError(_join(path, str(err))) from None
    return obj


def coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against type annotation `tp` (with int -> float widening) and return it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): coerce(args[1], v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {tp!r}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise ConfigError(f"--set {key.strip()}: value {raw!r} is not valid YAML ({problem})") from None
    return data


def load_yaml(path: str) -> dict:
    """Read a YAML mapping, naming the file in any error."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def to_dict(obj: Any) -> Any:
    """Plain nested dict of a config dataclass (what gets saved and hashed)."""
    return dataclasses.asdict(obj)


def stable_hash(obj: Any) -> str:
    """Short content hash of a config section, stable across runs and key order."""
    blob = json.dumps(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
