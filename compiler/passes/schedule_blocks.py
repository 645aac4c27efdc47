"""Order the work block by block: the non-layer tensors, then each transformer layer.

Saves are taken in tensor order (layers.tensor_order); each save's inputs are placed just before it, depth
first, so a block's tensors are read, merged and written together and can be freed as soon as their last
user has run. The graph is unchanged; the product is the Schedule.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from ..ir import Graph, Save
from ..layers import block_of, tensor_order
from .result import PassResult


@dataclass(frozen=True)
class Schedule:
    order: tuple[int, ...]  # every node once, each after its inputs
    blocks: Mapping[int, int]  # node -> the block (layer index, -1 for the others) it runs in


def schedule_blocks(graph: Graph) -> PassResult:
    saves = sorted(graph.of_kind(Save), key=lambda n: _save_key(graph, n))
    order: list[int] = []
    placed: set[int] = set()
    blocks: dict[int, int] = {}
    for s in saves:
        block = block_of(graph.payload(s).tensor)
        stack = [(s, False)]
        while stack:
            n, expanded = stack.pop()
            if n in placed:
                continue
            if expanded:
                placed.add(n)
                order.append(n)
                blocks[n] = block
                continue
            stack.append((n, True))
            for i in reversed(graph.inputs(n)):
                if i not in placed:
                    stack.append((i, False))
    return PassResult(graph, Counter(), Schedule(tuple(order), MappingProxyType(blocks)))


def _save_key(graph: Graph, n: int) -> tuple:
    p = graph.payload(n)
    return (*tensor_order(p.tensor), str(p.output))
