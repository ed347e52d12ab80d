"""The workflow's JSON schema and the configuration reference page, generated from the config
dataclasses (their :func:`pipeline.config.param` docs, units, defaults and checks).

``python -m pipeline config schema --write`` rewrites both committed copies
(``workflow/schemas/config.schema.yaml`` and ``docs/config.md``); a test checks they are current.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

import yaml

SCHEMA_PATH = "workflow/schemas/config.schema.yaml"
DOCS_PATH = "docs/config.md"


def _is_optional(typ) -> tuple[Any, bool]:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0], True
    return typ, False


def _type_schema(typ, meta: dict) -> dict:
    """JSON schema of one field type, with the range checks of ``meta`` applied to the scalars."""
    inner, optional = _is_optional(typ)
    origin = typing.get_origin(inner)
    if dataclasses.is_dataclass(inner):
        out = json_schema(inner)
    elif origin in (list, tuple):
        args = typing.get_args(inner)
        out = {"type": "array"}
        if origin is tuple and args and args[-1] is not Ellipsis:
            out.update(items=_scalar_schema(args[0], meta), minItems=len(args), maxItems=len(args))
        elif args and dataclasses.is_dataclass(args[0]):
            out["items"] = json_schema(args[0])
        else:
            out["items"] = _scalar_schema(args[0] if args else Any, meta)
    elif origin is dict or inner is dict:
        out = {"type": "object"}
    else:
        out = _scalar_schema(inner, meta)
    if optional:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


_JSON = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _scalar_schema(typ, meta: dict) -> dict:
    out = {"type": _JSON[typ]} if typ in _JSON else {}
    if "choices" in meta:
        out["enum"] = list(meta["choices"])
    if typ in (int, float):
        for key, word in (("min", "minimum"), ("max", "maximum"), ("gt", "exclusiveMinimum")):
            if key in meta:
                out[word] = meta[key]
    return out


def _description(f: dataclasses.Field) -> str:
    doc, unit = f.metadata.get("doc", ""), f.metadata.get("unit")
    return f"{doc} [{unit}]" if unit else doc


def json_schema(cls) -> dict:
    """Draft 2020-12 JSON schema of dataclass ``cls``: every field typed and described, unknown keys
    refused at every level."""
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        prop = {"description": _description(f), **_type_schema(hints[f.name], f.metadata)}
        props[f.name] = prop
    out = {"type": "object", "description": (cls.__doc__ or "").strip().splitlines()[0],
           "properties": props, "additionalProperties": False}
    return out


def schema_text(root) -> str:
    """The committed YAML text of the workflow schema of config class ``root``."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **json_schema(root)}
    head = ("# Generated from the config dataclasses by `python -m pipeline config schema --write`; "
            "do not edit.\n")
    return head + yaml.safe_dump(schema, sort_keys=False, width=110, allow_unicode=True)


def _type_name(typ) -> str:
    inner, optional = _is_optional(typ)
    origin = typing.get_origin(inner)
    if dataclasses.is_dataclass(inner):
        name = "section"
    elif origin in (list, tuple):
        args = typing.get_args(inner)
        if origin is tuple and args and args[-1] is not Ellipsis:
            name = f"[{', '.join(_type_name(a) for a in args)}]"
        else:
            name = f"list of {_type_name(args[0]) if args else 'any'}"
            name = "list of sections" if name == "list of section" else name
    elif origin is dict or inner is dict:
        name = "mapping"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _list_item(typ):
    """The item class of a ``list[Section]`` field, else None."""
    inner = _is_optional(typ)[0]
    args = typing.get_args(inner)
    if typing.get_origin(inner) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _allowed(meta: dict) -> str:
    parts = []
    if "choices" in meta:
        parts.append(" \\| ".join(f"`{c}`" for c in meta["choices"]))
    if "min" in meta:
        parts.append(f"≥ {meta['min']}")
    if "gt" in meta:
        parts.append(f"> {meta['gt']}")
    if "max" in meta:
        parts.append(f"≤ {meta['max']}")
    return ", ".join(parts)


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if not text or text.endswith(".") else ".")


def _rows(instance, prefix: str, sections: list) -> list[str]:
    """Table rows of the section ``instance`` (its values are the defaults shown); nested sections are
    appended to ``sections``."""
    cls = type(instance)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        typ, value = hints[f.name], getattr(instance, f.name)
        if dataclasses.is_dataclass(_is_optional(typ)[0]):
            sections.append((prefix + f.name, value))
            rows.append(f"| `{f.name}` | section | | | {_sentence(f.metadata.get('doc', ''))} See below. |")
            continue
        item = _list_item(typ)
        if item is not None:  # a list of sections: one table for its items, with the item class's defaults
            sections.append((prefix + f.name + "[]", item()))
            rows.append(f"| `{f.name}` | list of sections | `{json.dumps([vars(v) for v in value])}` | | "
                        f"{_sentence(f.metadata.get('doc', ''))} Each item: see below. |")
            continue
        unit = f.metadata.get("unit") or ""
        allowed = _allowed(f.metadata)
        doc = _sentence(f.metadata.get("doc", "")) + (f" Allowed: {allowed}." if allowed else "")
        rows.append(f"| `{f.name}` | {_type_name(typ)} | `{json.dumps(value)}` | {unit} | {doc} |")
    return rows


def reference_markdown(root, title: str = "Configuration reference") -> str:
    """The configuration reference page: one table per section, depth first in the order of the tree.
    Defaults are those of ``root()``, so a section nested with its own defaults shows them."""
    lines = [f"# {title}", "",
             "Generated from the config dataclasses by `python -m pipeline config schema --write`; do not edit.",
             "Every key is optional; a missing key takes the default shown. A wrong type, an out-of-range",
             "value or an unknown key, at any depth, stops `snakemake -n` and every command with one line",
             "naming the file and the field; `python -m pipeline config check FILE` checks a file on its own.", ""]
    todo = [("", root())]
    while todo:
        name, instance = todo.pop(0)
        doc = " ".join((type(instance).__doc__ or "").split())
        lines += [f"## `{name}`" if name else "## Top level", "", doc, "",
                  "| key | type | default | unit | meaning |", "|---|---|---|---|---|"]
        nested: list = []
        lines += _rows(instance, f"{name}." if name else "", nested)
        lines.append("")
        todo[0:0] = nested
    return "\n".join(lines)
