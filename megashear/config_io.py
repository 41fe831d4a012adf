"""Config dataclasses <-> YAML and dotted command-line overrides, with strict checking.

A run config is a tree of dataclasses. It is read from YAML files (later files override earlier
ones) and then from ``--section.field=value`` overrides, whose values are parsed as YAML
scalars (``--train.lr=1e-4``, ``--pruning.kinds=[head,layer]``). Every command-line flag is
generated from a dataclass field, so the parser and the dataclasses cannot drift apart.
Unknown keys and values of the wrong type are :class:`ConfigError`\\ s that name the key and
what it allows.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"config key '{key}': expected {allowed}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = _hints(cls)
    names = [f.name for f in _fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys: {', '.join(names)}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': {exc}") from exc


def to_dict(obj: Any) -> dict:
    """A plain (YAML-ready) mapping of a dataclass tree; tuples become lists."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in _fields(type(v))}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(obj)


def leaf_keys(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every dotted leaf key of a dataclass tree with its annotation."""
    out = []
    hints = _hints(cls)
    for f in _fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(leaf_keys(tp, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def merge(base: dict, update: dict) -> dict:
    """Recursive merge of YAML mappings (``update`` wins)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--dotted.key`` option per leaf field of ``cls`` (values parsed as YAML)."""
    for key, tp in leaf_keys(cls):
        parser.add_argument(
            f"--{key}",
            dest=f"cfg:{key}",
            metavar=_type_name(tp).upper().replace(" ", ""),
            default=argparse.SUPPRESS,
            help=f"config field {key} ({_type_name(tp)})",
        )


def resolve(cls: type, files: list[str], args: argparse.Namespace, base: dict | None = None):
    """Defaults < ``base`` < YAML ``files`` < command-line overrides, checked strictly."""
    data: dict = dict(base or {})
    for path in files:
        data = merge(data, load_yaml(path))
    for name, raw in vars(args).items():
        if name.startswith("cfg:"):
            try:
                value = yaml.safe_load(raw) if isinstance(raw, str) else raw
            except yaml.YAMLError:
                value = raw
            set_dotted(data, name[len("cfg:") :], value)
    return from_dict(cls, data)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_value(value: Any) -> str:
    """A value as YAML spells it (``true``, ``null``, ``4``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def given_keys(files: list[str], args: argparse.Namespace) -> dict[str, str]:
    """Every dotted key the YAML ``files`` or the command line set explicitly, each with where
    its winning value came from: ``--model.num_layers=4`` or ``model.num_layers=4 (run.yaml)``.

    The flags default to ``argparse.SUPPRESS``, so the namespace holds only the flags given.
    """
    out: dict[str, str] = {}
    for path in files:
        for key, value in _flatten(load_yaml(path)).items():
            out[key] = f"{key}={format_value(value)} ({path})"
    for name, raw in vars(args).items():
        if name.startswith("cfg:"):
            key = name[len("cfg:") :]
            out[key] = f"--{key}={raw}"
    return out


def dump_yaml(obj: Any, path: str) -> None:
    """Write a config atomically (temporary name, then rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)
    os.replace(tmp, path)
