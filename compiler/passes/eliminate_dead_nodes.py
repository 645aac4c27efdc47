"""Drop every node no save depends on, so a model no output needs is never read."""
from __future__ import annotations

from collections import Counter

import networkx as nx

from ..ir import Graph, Save
from .result import PassResult


def eliminate_dead_nodes(graph: Graph) -> PassResult:
    graph = graph.edited()
    live = set()
    for s in graph.of_kind(Save):
        live.add(s)
        live |= nx.ancestors(graph, s)
    dead = [n for n in graph.nodes if n not in live]
    fired = Counter(type(graph.payload(n)).__name__.lower() for n in dead)
    graph.remove_nodes_from(dead)
    return PassResult(graph.freeze(), fired)
