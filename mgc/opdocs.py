"""Operator reference generated from the stdlib schemas, so the docs cannot drift from the code."""
from __future__ import annotations

import typing
from dataclasses import dataclass

import annotated_types as at
from pydantic.fields import FieldInfo

from mgc.stdlib import OPERATORS, Operator


@dataclass(frozen=True)
class ParamDoc:
    name: str
    type: str
    default: str
    range: str
    description: str


def _unwrap(annotation):
    """(base type, constraint metadata, is_list) of a field annotation."""
    meta = []
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *extra = typing.get_args(annotation)
            meta.extend(extra)
        elif origin is typing.Union:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
        elif origin is list:
            is_list = True
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, meta, is_list


def _range(meta) -> str:
    lo = hi = ""
    for m in meta:
        for c in getattr(m, "metadata", [m]):
            if isinstance(c, at.Ge):
                lo = f"{c.ge} <= "
            elif isinstance(c, at.Gt):
                lo = f"{c.gt} < "
            elif isinstance(c, at.Le):
                hi = f" <= {c.le}"
            elif isinstance(c, at.Lt):
                hi = f" < {c.lt}"
    return f"{lo}x{hi}" if lo or hi else ""


def param_docs(op: Operator) -> list[ParamDoc]:
    out = []
    for name, f in op.params.model_fields.items():
        base, meta, is_list = _unwrap(f.annotation)
        meta = list(meta) + list(f.metadata)
        type_name = getattr(base, "__name__", str(base))
        if name in op.per_model:
            type_name += " per model"
        default = "required" if f.is_required() else _default(f, name in op.per_model)
        out.append(ParamDoc(f.alias or name, type_name, default, _range(meta), f.description or ""))
    return out


def _default(f: FieldInfo, per_model: bool) -> str:
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    if "default_text" in extra:
        return str(extra["default_text"])
    if isinstance(f.default, bool):
        return "true" if f.default else "false"
    return repr(f.default) if not isinstance(f.default, str) else f.default


def inputs_text(op: Operator) -> str:
    base = {"required": " + base", "optional": " (+ optional base)", "none": ""}[op.base]
    return op.arity_text() + base


def describe(op: Operator) -> str:
    lines = [f"{op.name}: {inputs_text(op)}", f"  {op.doc}", f"  reference: {op.reference}", "", "  parameters:"]
    docs = param_docs(op)
    if not docs:
        lines.append("    (none)")
    for p in docs:
        rng = f", {p.range}" if p.range else ""
        lines.append(f"    {p.name}: {p.type} = {p.default}{rng}")
        if p.description:
            lines.append(f"        {p.description}")
    return "\n".join(lines)


def markdown_table() -> str:
    rows = ["| operator | inputs | parameter | type | default | range | meaning |", "|---|---|---|---|---|---|---|"]
    for op in OPERATORS.values():
        docs = param_docs(op) or [ParamDoc("", "", "", "", "")]
        for i, p in enumerate(docs):
            head = (f"`{op.name}`", inputs_text(op)) if i == 0 else ("", "")
            rng = p.range.replace("<", "&lt;")
            rows.append(f"| {head[0]} | {head[1]} | `{p.name}` | {p.type} | {p.default} | {rng} | {p.description} |")
    return "\n".join(rows)


def math_table() -> str:
    rows = ["| operator | math | reference |", "|---|---|---|"]
    for op in OPERATORS.values():
        rows.append(f"| `{op.name}` | {op.doc.replace('|', '&#124;')} | {op.reference} |")
    return "\n".join(rows)
