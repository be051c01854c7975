"""Typed configs: dataclasses loaded from YAML, overridden as `key.sub=value`, validated strictly.

Every component owns a small dataclass (models.objective.ObjectiveConfig, ...). This module only knows how
to turn nested mappings into those dataclasses and back; it never guesses: an unknown key, a wrong type or a
value outside a Literal is an error that names the key, the allowed values and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` and `2e-4` as strings (its floats need a dot and a signed exponent); learning rates
    are written that way, so floats are read as YAML 1.2 (and Python) write them."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str | bytes) -> Any:
    """YAML as configs are read: safe, with YAML 1.2 floats."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config value a user must fix; the message says which key, what was found and what is allowed."""


def _closest(key: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(" / ".join(errors))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, found {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, found {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        converted = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, found {value!r}")
        return {str(k): _convert(args[1] if args else Any, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, found {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, found {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, found {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, found {value!r}")
        return value
    raise TypeError(f"{where}: config type {tp!r} is not supported")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{path}'{_closest(str(key), names)} (valid keys: {', '.join(names)})")
        kwargs[key] = _convert(hints[key], value, path)
    try:
        return cls(**kwargs)
    except (ConfigError, ValueError) as e:  # __post_init__ checks raise ValueError naming their own key
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) that `from_dict` reads back to an equal config."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `key.sub=value` strings; values are parsed as YAML scalars/lists (`lr=1e-4`, `betas=[0.9,0.99]`)."""
    data = read_yaml(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{k}' is a value, not a section")
        node[keys[-1]] = read_yaml(raw)
    return data


INCLUDE = "include"


def read_file(path: Path, where: str = "", seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping with its includes resolved: a section `{include: FILE, key: value, ...}` is FILE's mapping
    (a path relative to the including file) with the section's other keys replacing or merged into its own, so
    that presets share one copy of a fragment (configs/objectives/) and change only what differs."""
    if not path.is_file():
        raise ConfigError(f"{where + ': ' if where else ''}config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{where}: {path} includes itself (through {' -> '.join(str(p) for p in seen)})")
    data = read_yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, found {type(data).__name__}")
    return _resolve(data, path, "", (*seen, path.resolve()))


def _resolve(data: dict, path: Path, where: str, seen: tuple[Path, ...]) -> dict:
    out = {k: _resolve(v, path, f"{where}.{k}" if where else str(k), seen) if isinstance(v, dict) else v
           for k, v in data.items() if k != INCLUDE}
    if INCLUDE not in data:
        return out
    name = data[INCLUDE]
    key = f"{path}: {where + '.' if where else ''}{INCLUDE}"
    if not isinstance(name, str):
        raise ConfigError(f"{key} must be a file name, found {name!r}")
    return _merge(read_file(path.parent / name, key, seen), out)


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for k, v in top.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load `cls` from a YAML file (or defaults when path is None), then apply overrides, then validate."""
    data = read_file(Path(path)) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
