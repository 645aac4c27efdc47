"""Drop every node no save depends on, so a model no output needs is never read."""
from __future__ import annotations

from collections import Counter

from ..ir import Graph, Save
from .result import PassResult


def eliminate_dead_nodes(graph: Graph) -> PassResult:
    graph = graph.edited()
    live = graph.needed(graph.of_kind(Save))
    dead = [n for n in graph.nodes if n not in live]
    fired = Counter(type(graph.payload(n)).__name__.lower() for n in dead)
    graph.remove_nodes_from(dead)
    return PassResult(graph.freeze(), fired)
