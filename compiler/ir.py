"""The tensor graph: one networkx DiGraph of load, apply and save nodes.

Node ids are ints; each node's attribute ``node`` holds its payload (a frozen
dataclass below) and ``inputs`` the ordered tuple of input node ids (an input may
appear twice, as in slerp(a, a)). Edges mirror ``inputs`` for traversal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import networkx as nx
import torch

from mgc.core.errors import Span


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Load:
    checkpoint: Path
    tensor: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def key(self) -> tuple:
        return ("load", self.checkpoint, self.tensor)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    def label(self) -> str:
        return f"load {self.checkpoint.name}:{self.tensor}"


@dataclass(frozen=True)
class Apply:
    op: str
    params: Any  # the operator's validated pydantic params
    has_base: bool
    tensor: str  # the output tensor this was lowered for (for messages)
    shape: tuple[int, ...]
    span: Optional[Span] = field(default=None, compare=False)
    # model-valued parameters: (name, count) of the inputs that follow the models, in order
    aux: tuple[tuple[str, int], ...] = ()
    # the tensor name that seeds a random operator's draws (None for the others): it changes the result,
    # so it is part of the node's identity, unlike `tensor`, which only names the node in messages
    seed_tensor: Optional[str] = None

    def key(self) -> tuple:
        """Everything the runtime reads to compute this node, besides its inputs."""
        return ("apply", self.op, params_key(self.params), self.has_base, self.aux, self.seed_tensor)

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
        )
        return f"{self.op}({shown})"


@dataclass(frozen=True)
class Save:
    output: Path
    tensor: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def key(self) -> tuple:
        return ("save", self.output, self.tensor)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    def label(self) -> str:
        return f"save {self.output.name}:{self.tensor}"


Payload = Union[Load, Apply, Save]


def params_key(params: Any) -> tuple:
    def freeze(v):
        return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v

    return tuple((k, freeze(v)) for k, v in sorted(params.model_dump().items()))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


class Graph(nx.DiGraph):
    """A DiGraph with helpers that keep ``inputs`` and the edges in step."""

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

    def of_kind(self, kind: type) -> list[int]:
        return [n for n, d in self.nodes(data=True) if isinstance(d["node"], kind)]

    def set_inputs(self, n: int, inputs: Iterable[int]) -> None:
        """Give `n` new inputs, in order, and the edges to match."""
        inputs = tuple(inputs)
        for i in set(self.nodes[n]["inputs"]) - set(inputs):
            self.remove_edge(i, n)
        self.nodes[n]["inputs"] = inputs
        for i in inputs:
            self.add_edge(i, n)

    def replace(self, old: int, new: int) -> None:
        """Point every user of `old` at `new`, then drop `old`."""
        for user in list(self.successors(old)):
            self.nodes[user]["inputs"] = tuple(new if i == old else i for i in self.nodes[user]["inputs"])
            self.add_edge(new, user)
        self.remove_node(old)

    def counts(self) -> dict[str, int]:
        out = {"load": 0, "apply": 0, "save": 0}
        for _, d in self.nodes(data=True):
            out[type(d["node"]).__name__.lower()] += 1
        return out


def saved_dtype_results(graph: Graph) -> dict[int, torch.dtype]:
    """The apply nodes whose every user is a save of one dtype: the runtime has them produce that dtype
    directly (where the operator can), instead of a float32 result cast at the save."""
    out = {}
    for n in graph.of_kind(Apply):
        dtypes = {graph.payload(u).dtype if isinstance(graph.payload(u), Save) else None for u in graph.successors(n)}
        if len(dtypes) == 1 and None not in dtypes:
            out[n] = dtypes.pop()
    return out
