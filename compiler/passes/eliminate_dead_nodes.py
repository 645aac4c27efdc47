"""Drop every node no save depends on, so a model no output needs is never read."""
from __future__ import annotations

from collections import Counter

import networkx as nx

from ..ir import Graph, Save


def eliminate_dead_nodes(graph: Graph) -> Graph:
    live = set()
    for s in graph.of_kind(Save):
        live.add(s)
        live |= nx.ancestors(graph, s)
    dead = [n for n in graph.nodes if n not in live]
    fired = Counter(type(graph.payload(n)).__name__.lower() for n in dead)
    graph.remove_nodes_from(dead)
    graph.graph.setdefault("fired", {})["eliminate_dead_nodes"] = fired
    return graph
