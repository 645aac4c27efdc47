"""Order the work block by block: the non-layer tensors, then each transformer layer.

Saves are taken in tensor order (see lower.tensor_order); each save's inputs are
placed just before it, depth first, so a block's tensors are read, merged and
written together and can be freed as soon as their last user has run. The order
is stored as ``graph.graph["order"]``; ``graph.graph["blocks"]`` maps node -> block.
"""
from __future__ import annotations

from ..ir import Graph, Save
from ..layers import leading_index


def schedule_blocks(graph: Graph) -> Graph:
    saves = sorted(graph.of_kind(Save), key=lambda n: _save_key(graph, n))
    order: list[int] = []
    placed: set[int] = set()
    blocks: dict[int, int] = {}
    for s in saves:
        block = _block(graph.payload(s).tensor)
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
    graph.graph["order"] = order
    graph.graph["blocks"] = blocks
    return graph


def _block(tensor: str) -> int:
    i = leading_index(tensor)
    return -1 if i is None else i


def _save_key(graph: Graph, n: int) -> tuple:
    p = graph.payload(n)
    return (_block(p.tensor), p.tensor, str(p.output))
