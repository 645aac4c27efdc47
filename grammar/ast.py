"""The recipe AST: frozen dataclasses, each carrying the Span it came from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from mgc.core.errors import Source, Span

# Levels of calls, lists, tables, `with` and `.layers[...]` one expression may nest (the parser refuses
# deeper ones; the checker adds up the levels of def bodies called within each other). The checker and
# lowering recurse once per level, so this keeps them far from Python's recursion limit.
MAX_NESTING = 64


@dataclass(frozen=True)
class Number:
    value: Union[int, float]
    span: Span


@dataclass(frozen=True)
class String:
    value: str
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class List:
    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class KeyName:
    """A bare selector: `mlp`, `self_attn`, or `_`, the default."""

    name: str
    span: Span


@dataclass(frozen=True)
class KeyString:
    """A quoted selector: an exact tensor name, a substring of one, or a glob with `*`."""

    value: str
    span: Span


@dataclass(frozen=True)
class KeyLayers:
    """`layers[a:b]`: the tensors of transformer layers a (inclusive) to b (exclusive)."""

    start: Optional[int]
    stop: Optional[int]
    span: Span


Key = Union[KeyName, KeyString, KeyLayers]


@dataclass(frozen=True)
class Entry:
    key: Key
    value: "Expr"
    span: Span


@dataclass(frozen=True)
class Table:
    entries: tuple[Entry, ...]
    span: Span


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: "Expr"
    span: Span  # of the name


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[Kwarg, ...]
    span: Span
    func_span: Span


@dataclass(frozen=True)
class LayerSlice:
    """`m.layers[a:b]`, an argument of `stack`."""

    value: "Expr"
    start: Optional[int]
    stop: Optional[int]
    span: Span


@dataclass(frozen=True)
class With:
    value: "Expr"
    table: Table
    span: Span


Expr = Union[Number, String, Name, List, Table, Call, LayerSlice, With]


@dataclass(frozen=True)
class Assign:
    name: str
    value: Expr
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Def:
    name: str
    params: tuple[str, ...]
    body: Expr
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Option:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Save:
    value: Expr
    path: str
    options: tuple[Option, ...]
    span: Span
    path_span: Span


Statement = Union[Assign, Def, Save]


def _levels(expr: Expr, limit: Optional[int] = None):
    """(node, its level) for the nodes of an expression that are a level of nesting (calls, lists, tables,
    `with` and `.layers[...]`; the table of a `with` belongs to the `with`), walked iteratively. Below a node
    at a level past `limit`, nothing more is walked."""
    todo = [(expr, 0)]
    while todo:
        x, level = todo.pop()
        if isinstance(x, (Call, List, Table, With, LayerSlice)):
            level += 1
            yield x, level
            if limit is not None and level > limit:
                continue
        kids = (list(x.args) + [k.value for k in x.kwargs] if isinstance(x, Call) else
                x.items if isinstance(x, List) else
                [e.value for e in x.entries] if isinstance(x, Table) else
                [x.value] + [e.value for e in x.table.entries] if isinstance(x, With) else
                [x.value] if isinstance(x, LayerSlice) else ())
        todo.extend((k, level) for k in kids)


def nesting(expr: Expr) -> int:
    """The levels of nesting in an expression (see _levels)."""
    return max((level for _, level in _levels(expr)), default=0)


def too_deep(expr: Expr, limit: int = MAX_NESTING) -> Optional[Expr]:
    """The first node, in the text, that is nested deeper than `limit` levels; None if there is none."""
    beyond = [x for x, level in _levels(expr, limit) if level > limit]
    return min(beyond, key=lambda x: (x.span.line, x.span.col), default=None)


@dataclass(frozen=True)
class Recipe:
    statements: tuple[Statement, ...]
    source: Source
