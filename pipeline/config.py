"""Typed config sections with one-line errors that name the file and the field.

Each command reads one section of the pipeline's YAML config into a dataclass. Fields are declared
with :func:`param`, which carries the field's documentation, unit, range and choices; the JSON schema
of the workflow and the configuration reference page in ``docs/`` are generated from them.
Unknown keys, wrong types and out-of-range values raise :class:`pipeline.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.config_renames import RENAMED
from pipeline.errors import ConfigError, InputFileError

T = TypeVar("T")

CHECKS = ("min", "max", "gt", "choices")


def param(default=dataclasses.MISSING, doc: str = "", unit: str | None = None, *, factory=None, **checks):
    """A documented config field: ``default`` (lists, dicts and sets are copied per instance; a
    dataclass type makes a nested section built with its own defaults; ``factory`` builds a default
    instance per use instead, e.g. a nested section with other defaults than its class's), a
    one-sentence ``doc``, the ``unit`` of the value (None for dimensionless or not a quantity) and range
    checks ``min``, ``max`` (inclusive), ``gt`` (exclusive) and ``choices``."""
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise TypeError(f"param(): unknown check {unknown[0]!r} (known: {', '.join(CHECKS)})")
    meta = {"doc": doc, "unit": unit, **checks}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load_yaml(path) -> dict:
    """Read a YAML mapping; a missing or unparsable file is a one-line InputFileError."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputFileError(path, f"not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputFileError(path, "top level must be a mapping")
    return data


def _check_scalar(value, typ, source, name):
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(source, name, f"expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _convert(value, typ, source, name):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], source, name)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(source, name, f"expected a mapping, got {type(value).__name__}")
        return from_mapping(typ, value, source, prefix=name + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, name, f"expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(typ)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(source, name, f"expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, source, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, source, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, name, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if typ is Any:
        return value
    return _check_scalar(value, typ, source, name)


def _check_range(value, meta, source, name):
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_range(v, meta, source, f"{name}[{i}]")
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(source, name, f"must be one of {list(meta['choices'])}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise ConfigError(source, name, f"must be >= {meta['min']}, got {value}")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(source, name, f"must be <= {meta['max']}, got {value}")
        if "gt" in meta and not value > meta["gt"]:
            raise ConfigError(source, name, f"must be > {meta['gt']}, got {value}")


def unknown_field(source, prefix: str, key, names) -> ConfigError:
    """The error for ``prefix + key``, not a field of its section: where it moved if it moved (see
    :mod:`pipeline.config_renames`), else the closest known name."""
    dotted = f"{prefix}{key}"
    if dotted in RENAMED:
        new = RENAMED[dotted]
        return ConfigError(source, dotted, new if new.startswith("removed") else f"renamed: now '{new}'")
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known: {', '.join(sorted(names))}"
    return ConfigError(source, dotted, f"unknown field ({hint})")


def from_mapping(cls: type[T], data: dict | None, source="<config>", prefix: str = "", base=None) -> T:
    """Build dataclass ``cls`` from ``data``, validating every field. Missing keys take the values of
    ``base`` (an instance of ``cls``) when given, else the class defaults; a nested section given as a
    mapping is built on top of its field's default, so a section nested with other defaults than its
    class's (``param(factory=...)``) keeps them for the keys it does not set."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise unknown_field(source, prefix, unknown[0], names)
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if f.name in data:
            value, typ = data[f.name], hints[f.name]
            if dataclasses.is_dataclass(typ) and isinstance(value, dict):
                inner = getattr(base, f.name) if base is not None else _field_default(f)
                value = from_mapping(typ, value, source, prefix=name + ".", base=inner)
            else:
                value = _convert(value, typ, source, name)
            _check_range(value, f.metadata, source, name)
            kwargs[f.name] = value
        elif base is not None:
            kwargs[f.name] = copy.deepcopy(getattr(base, f.name))
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(source, prefix.rstrip(".") or cls.__name__, str(exc)) from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check(source, prefix)
    return obj


def _field_default(f: dataclasses.Field):
    """The default value of field ``f`` (a fresh instance for a default factory), or None without one."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def load_section(path, section: str, cls: type[T], required: bool = False) -> T:
    """Read ``section`` of the YAML file at ``path`` into ``cls``."""
    data = load_yaml(path)
    if section not in data:
        if required:
            raise ConfigError(path, section, "section missing")
        return from_mapping(cls, {}, path, prefix=section + ".")
    return from_mapping(cls, data[section], path, prefix=section + ".")


def config_hash(obj) -> str:
    """Stable short hash of a config (dataclass or mapping) for provenance and resume checks."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


DEVICES = ("auto", "cpu", "cuda")


def read_device(path) -> str:
    """The top-level ``device`` of the config file at ``path`` (``auto`` when absent): ``auto`` picks
    CUDA when available, else the CPU (see :func:`pipeline.runtime.choose_device`)."""
    value = load_yaml(path).get("device", "auto")
    if value not in DEVICES:
        raise ConfigError(path, "device", f"must be one of {list(DEVICES)}, got {value!r}")
    return value
