"""The recipe AST: frozen dataclasses, each carrying the Span it came from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .errors import Source, Span


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


@dataclass(frozen=True)
class Recipe:
    statements: tuple[Statement, ...]
    source: Source
