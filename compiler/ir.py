"""The tensor graph: one networkx DiGraph of load, apply and save nodes.

Node ids are ints; each node's attribute ``node`` holds its payload (a frozen
dataclass below) and ``inputs`` the ordered tuple of input node ids (an input may
appear twice, as in slerp(a, a)). Edges mirror ``inputs`` for traversal.

A payload's identity (``key()``) is every field the runtime reads to compute it; only fields declared
``label`` (names and spans for messages) are left out. Two nodes with equal keys and equal inputs compute
the same bytes, which is what lets common-subexpression elimination merge them.

A graph is frozen once built: a pass works on a copy (``Graph.edited()``) and returns it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import networkx as nx

from mgc.core.dtypes import DType, keep_dtype
from mgc.core.errors import Span


def _itemsize(dtype: DType) -> int:
    return dtype.itemsize


def label_field(*default: Any) -> Any:
    """A field that names a node in messages and never changes what it computes: not part of its identity."""
    return field(compare=False, metadata={"label": True}, **({"default": default[0]} if default else {}))


class Node:
    def key(self) -> tuple:
        """Everything the runtime reads to compute this node, besides its inputs."""
        return (type(self).__name__.lower(),) + tuple(
            _frozen(getattr(self, f.name)) for f in fields(self) if not f.metadata.get("label")
        )


class Stored:
    """A tensor as a file holds it (a load's input, a save's output): its size is its shape and dtype's."""

    shape: tuple[int, ...]
    dtype: DType

    def __post_init__(self) -> None:
        keep_dtype(self)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


@dataclass(frozen=True)
class Load(Node, Stored):
    checkpoint: Path
    tensor: str
    shape: tuple[int, ...]
    dtype: DType

    def label(self) -> str:
        return f"load {self.checkpoint.name}:{self.tensor}"


@dataclass(frozen=True)
class Apply(Node):
    op: str
    params: Any  # the operator's validated pydantic params
    has_base: bool
    tensor: str = label_field()  # the output tensor this was lowered for
    shape: tuple[int, ...]
    span: Optional[Span] = label_field(None)
    # model-valued parameters: (name, count) of the inputs that follow the models, in order
    aux: tuple[tuple[str, int], ...] = ()
    # the tensor name that seeds a random operator's draws (None for the others): unlike `tensor`, it
    # changes the result
    seed_tensor: Optional[str] = None
    # c for a tensor the model applies as c + w (Gemma's norms: 1 + w) under an operator that does not commute with
    # a shift (compiler/norm_offsets.py): the runtime merges xᵢ + c (models and base) and takes c off the result
    offset: float = 0.0

    def split(self, inputs: list) -> tuple[Optional[object], list, dict[str, list]]:
        """(base, models, {aux name: inputs}) from the flat input list."""
        base = inputs[0] if self.has_base else None
        rest = list(inputs[1:] if self.has_base else inputs)
        n_aux = sum(count for _, count in self.aux)
        models, tail = rest[: len(rest) - n_aux], rest[len(rest) - n_aux:]
        extra = {}
        for name, count in self.aux:
            extra[name], tail = tail[:count], tail[count:]
        return base, models, extra

    @property
    def nbytes(self) -> int:  # computed in float32
        return math.prod(self.shape) * 4

    def label(self) -> str:
        shown = ", ".join(
            [f"{k}={_fmt(v)}" for k, v in self.params.model_dump(by_alias=True).items()]
            + [f"{name}=<{count} models>" for name, count in self.aux]
            + ([f"merged as w + {_fmt(self.offset)}"] if self.offset else [])
        )
        return f"{self.op}({shown})"


@dataclass(frozen=True)
class Save(Node, Stored):
    output: Path
    tensor: str
    shape: tuple[int, ...]
    dtype: DType

    def label(self) -> str:
        return f"save {self.output.name}:{self.tensor}"


@dataclass(frozen=True)
class Rows(Node):
    """A tensor assembled from rows of its inputs: how a vocabulary-indexed tensor (embeddings, head) is aligned to
    the output's vocabulary (compiler/vocab_lower.py). Row i is row index[i] of input source[i] (int32 arrays,
    as bytes). A row whose source is -1 is filled by a `means` entry (out, ((input, rows), ...)): row out[j] is the
    mean of row rows[j] of each listed input; a row no entry fills is the mean of the copied rows (source >= 0).
    The result has its inputs' dtype (the widest of them)."""

    shape: tuple[int, ...]
    source: bytes
    index: bytes
    means: tuple[tuple[bytes, tuple[tuple[int, bytes], ...]], ...] = ()
    tensor: str = label_field("")

    @property
    def nbytes(self) -> int:  # at most float32
        return math.prod(self.shape) * 4

    def label(self) -> str:
        return f"rows {self.tensor} ({self.shape[0]} rows)"


Payload = Union[Load, Apply, Save, Rows]


def _frozen(v: Any) -> Any:
    """A hashable value equal for equal inputs: pydantic params by their fields, lists as tuples."""
    if hasattr(v, "model_dump"):
        return (type(v).__qualname__,) + tuple((k, _frozen(x)) for k, x in sorted(v.model_dump().items()))
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


class Graph(nx.DiGraph):
    """A DiGraph with helpers that keep ``inputs`` and the edges in step. Built by lowering, then frozen."""

    def freeze(self) -> "Graph":
        return nx.freeze(self)

    def edited(self) -> "Graph":
        """A mutable copy with the same node ids, for a pass to rewrite and return."""
        g = Graph(self)
        g.graph = dict(self.graph)
        return g

    def add(self, payload: Payload, inputs: Iterable[int] = ()) -> int:
        n = self.graph.setdefault("next_id", 0)
        self.graph["next_id"] = n + 1
        inputs = tuple(inputs)
        self.add_node(n, node=payload, inputs=inputs)
        for i in inputs:
            self.add_edge(i, n)
        return n

    def payload(self, n: int) -> Payload:
        return self.nodes[n]["node"]

    def inputs(self, n: int) -> tuple[int, ...]:
        return self.nodes[n]["inputs"]

    def needed(self, roots: Iterable[int], through: Optional[Callable[[int], bool]] = None) -> set[int]:
        """The roots and every node they read, directly or not; a node for which `through` says False is kept but
        what it reads is not looked at (a value held already needs no inputs)."""
        live: set[int] = set()
        todo = list(roots)
        while todo:
            n = todo.pop()
            if n in live:
                continue
            live.add(n)
            if through is None or through(n):
                todo.extend(self.nodes[n]["inputs"])
        return live

    def of_kind(self, kind: type) -> list[int]:
        return [n for n, d in self.nodes(data=True) if isinstance(d["node"], kind)]

    def set_inputs(self, n: int, inputs: Iterable[int]) -> None:
        """Give `n` new inputs, in order, and the edges to match."""
        self._unfrozen()
        inputs = tuple(inputs)
        for i in set(self.nodes[n]["inputs"]) - set(inputs):
            self.remove_edge(i, n)
        self.nodes[n]["inputs"] = inputs
        for i in inputs:
            self.add_edge(i, n)

    def replace(self, old: int, new: int) -> None:
        """Point every user of `old` at `new`, then drop `old`."""
        self._unfrozen()
        for user in list(self.successors(old)):
            self.nodes[user]["inputs"] = tuple(new if i == old else i for i in self.nodes[user]["inputs"])
            self.add_edge(new, user)
        self.remove_node(old)

    def _unfrozen(self) -> None:
        if nx.is_frozen(self):
            raise nx.NetworkXError("Frozen graph can't be modified: rewrite graph.edited()")

    def counts(self) -> dict[str, int]:
        out = {"load": 0, "apply": 0, "save": 0}
        for _, d in self.nodes(data=True):
            kind = type(d["node"]).__name__.lower()
            out[kind] = out.get(kind, 0) + 1  # "rows" only where a vocabulary is aligned
        return out


def saved_dtype_results(graph: Graph) -> dict[int, DType]:
    """The apply nodes whose every user is a save of one dtype: the runtime has them produce that dtype
    directly (where the operator can), instead of a float32 result cast at the save."""
    out = {}
    for n in graph.of_kind(Apply):
        dtypes = {graph.payload(u).dtype if isinstance(graph.payload(u), Save) else None for u in graph.successors(n)}
        if len(dtypes) == 1 and None not in dtypes:
            out[n] = dtypes.pop()
    return out


def meanings(graph: Graph) -> dict[int, tuple]:
    """Each node's meaning: its payload's key and, in order, its inputs' meanings. Equal across graphs for equal
    computations, so a value computed for one graph can stand for a node of another with the same meaning."""
    out: dict[int, tuple] = {}
    for n in nx.topological_sort(graph):
        out[n] = (graph.payload(n).key(), tuple(out[i] for i in graph.inputs(n)))
    return out
