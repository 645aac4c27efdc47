"""Selectors as a recipe writes them, table keys and `with` entries: built from the AST, their layer bounds
counted from the end, and the hint when one matches no tensor."""
from __future__ import annotations

import dataclasses

from mgc.core.errors import did_you_mean
from mgc.grammar import ast

from .values import ListV, Selector, TableV, Value


def selector_of(key) -> Selector:
    if isinstance(key, ast.KeyName):
        if key.name == "_":
            return Selector("default", span=key.span)
        return Selector("pattern", key.name, span=key.span)
    if isinstance(key, ast.KeyString):
        return Selector("pattern", key.value, span=key.span)
    return Selector("layers", start=key.start, stop=key.stop, span=key.span)


def layer_bounds(selector: Selector, num_layers: int) -> Selector:
    """`layers[-2:]` counts from the end, as in stack's m.layers[-2:]."""
    if selector.kind != "layers":
        return selector
    start, stop = selector.start, selector.stop
    if start is not None and start < 0:
        start += num_layers
    if stop is not None and stop < 0:
        stop += num_layers
    return dataclasses.replace(selector, start=start, stop=stop)


def bind_layers(value: Value, num_layers: int) -> Value:
    """`value` with the layer bounds of every table in it counted from the end."""
    if isinstance(value, TableV):
        return TableV(
            tuple((layer_bounds(s, num_layers), bind_layers(v, num_layers)) for s, v in value.entries), value.span
        )
    if isinstance(value, ListV):
        return ListV(tuple(bind_layers(v, num_layers) for v in value.items), value.span, value.gradient)
    return value


def selector_hint(selector: Selector, tensors) -> str:
    if selector.kind == "pattern":
        parts = sorted({p for n in tensors for p in n.split(".") if not p.isdigit()})
        close = did_you_mean(selector.pattern, parts)
        if close:
            return close
        return f"tensor names look like '{next(iter(tensors), '')}'"
    return "no tensor lies in that layer range"
