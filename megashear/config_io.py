"""Config dataclasses <-> YAML and dotted command-line overrides, with strict checking.

A run config is a tree of dataclasses. It is read from YAML files (later files override earlier
ones) and then from ``--section.field=value`` overrides, whose values are parsed as YAML
scalars (``--train.lr=1e-4``, ``--pruning.kinds=[head,layer]``). Every command-line flag is
generated from a dataclass field, so the parser and the dataclasses cannot drift apart.
Unknown keys and values of the wrong type are :class:`ConfigError`\\ s that name the key and
what it allows; a ``Literal[...]`` field (or a tuple of them) accepts only its listed values.

Documentation: each field's attribute docstring (the string literal right after it in the
class body) is read from the dataclass's source by :func:`field_docs` and becomes its ``--help``
text, with its type, choices and default. :func:`add_arguments` can offer only some top-level
sections (a sub-command's); :func:`resolve` still reads YAML files as the whole tree.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Iterable
from typing import Any

import yaml

from megashear.atomic_file import write_text_atomic


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (and its dataclass bases), one line each.

    A field's docstring is the string literal that directly follows its annotated assignment in
    the class body; it is read from the class's source with :mod:`ast` (the interpreter keeps no
    trace of it). A field without one is absent from the result.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source file (e.g. a class built in a REPL)
            continue
        body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                out[stmt.target.id] = " ".join(nxt.value.value.split())
    return out


def _optional(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def choices(tp: Any) -> tuple | None:
    """The allowed values of a ``Literal[...]`` annotation (also inside ``| None`` and as the
    item type of a tuple or list); ``None`` for any other annotation."""
    inner, _ = _optional(tp)
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        return typing.get_args(inner)
    if origin in (tuple, list) and typing.get_args(inner):
        return choices(typing.get_args(inner)[0])
    return None


def type_label(tp: Any) -> str:
    """An annotation as ``--help`` and error messages spell it: ``int or null``,
    ``one of paper, constant``, ``list of str``."""
    inner, nullable = _optional(tp)
    if nullable:
        return f"{type_label(inner)} or null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(format_value(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_label(a) for a in args)
    if origin in (tuple, list):
        return f"list of {type_label(args[0]) if args else 'values'}"
    if origin is dict or tp is dict:
        return "mapping"
    return {int: "int", float: "float", bool: "bool", str: "str", type(None): "null"}.get(
        tp, _type_name(tp)
    )


def _metavar(tp: Any) -> str:
    inner, nullable = _optional(tp)
    allowed = choices(inner)
    if allowed is not None:
        text = "{" + ",".join(str(a) for a in allowed) + "}"
        if typing.get_origin(inner) in (tuple, list):
            text = f"[{text},...]"
    elif typing.get_origin(inner) in (tuple, list):
        text = "LIST"
    else:
        text = type_label(inner).upper()
    return f"{text}|NULL" if nullable else text


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
        raise ConfigError(f"config key '{key}': expected {type_label(tp)}, got {value!r}")
    if origin is typing.Literal:
        for allowed in args:
            if type(value) is type(allowed) and value == allowed:
                return value
        raise ConfigError(
            f"config key '{key}': expected one of {', '.join(format_value(a) for a in args)}; "
            f"got {value!r}"
        )
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


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _format_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return format_value(value)


def _section_description(cls: type) -> str:
    """The first paragraph of a dataclass's docstring, on one line."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    return " ".join(doc.split("\n\n")[0].split())


def _add_leaves(target, cls: type, prefix: str) -> None:
    hints = _hints(cls)
    docs = field_docs(cls)
    for f in _fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            _add_leaves(target, tp, f"{key}.")
            continue
        doc = docs.get(f.name, f"config field {key}")
        shown = f"{doc} ({type_label(tp)}; default: {_format_default(_default(f))})"
        target.add_argument(
            f"--{key}",
            dest=f"cfg:{key}",
            metavar=_metavar(tp),
            default=argparse.SUPPRESS,
            help=shown.replace("%", "%%"),
        )


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, sections: Iterable[str] | None = None
) -> None:
    """One ``--dotted.key`` option per leaf field of ``cls`` (values parsed as YAML).

    ``sections`` names the top-level fields of ``cls`` to offer (a dataclass field is a
    section, a plain field such as ``model_preset`` is one option); ``None`` offers all. Each
    section's options form one ``--help`` group, described by its class docstring; each option's
    help is its field docstring with its type, choices and default. A flag of a section not
    offered is argparse's usual "unrecognized arguments" error.
    """
    names = [f.name for f in _fields(cls)]
    offered = names if sections is None else list(sections)
    unknown = [s for s in offered if s not in names]
    if unknown:
        raise ValueError(f"{cls.__name__} has no section {unknown[0]!r}; it has {names}")
    hints = _hints(cls)
    top = [f for f in _fields(cls) if f.name in offered]
    for f in top:
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            _add_leaves_one(parser, cls, f)
    for f in top:
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            group = parser.add_argument_group(f.name, _section_description(tp))
            _add_leaves(group, tp, f"{f.name}.")


def add_field_option(
    parser: argparse.ArgumentParser, cls: type, key: str, *aliases: str, default: Any = None
) -> None:
    """A tool's option for one run-config field, under the ``megashear`` command's name.

    ``key`` is the dotted field of ``cls`` (``parallel.tp``); the option is ``--parallel.tp``
    (plus ``aliases`` such as ``--tp``), its help the field's docstring, its value parsed and
    checked as that field's type, stored in ``args.<last part of key>``. ``default`` replaces
    the field's own default (``None``: keep it).
    """
    section, _, name = key.rpartition(".")
    owner = cls
    for part in filter(None, section.split(".")):
        owner = _hints(owner)[part]
    f = next((f for f in _fields(owner) if f.name == name), None)
    if f is None:
        raise ValueError(f"{cls.__name__} has no field {key!r}")
    tp = _hints(owner)[name]
    value = _default(f) if default is None else default
    doc = field_docs(owner).get(name, f"config field {key}")

    def parse(raw: str) -> Any:
        try:
            return _coerce(yaml.safe_load(raw), tp, key)
        except (ConfigError, yaml.YAMLError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = type_label(tp)  # argparse names the type in its error message
    parser.add_argument(
        f"--{key}",
        *aliases,
        dest=name,
        type=parse,
        default=value,
        metavar=_metavar(tp),
        help=f"{doc} ({type_label(tp)}; default: {_format_default(value)})".replace("%", "%%"),
    )


def _add_leaves_one(target, cls: type, f: dataclasses.Field) -> None:
    """The option of one plain top-level field of ``cls``."""
    tp = _hints(cls)[f.name]
    doc = field_docs(cls).get(f.name, f"config field {f.name}")
    shown = f"{doc} ({type_label(tp)}; default: {_format_default(_default(f))})"
    target.add_argument(
        f"--{f.name}",
        dest=f"cfg:{f.name}",
        metavar=_metavar(tp),
        default=argparse.SUPPRESS,
        help=shown.replace("%", "%%"),
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
    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
