"""Merge nodes that compute the same thing: same payload key, same inputs.

    a = slerp(x, y, t = 0.5)
    b = slerp(x, y, t = 0.5)   # written twice, runs once
"""
from __future__ import annotations

from collections import Counter

import networkx as nx

from ..ir import Graph, Save
from .result import PassResult


def eliminate_common_subexpressions(graph: Graph) -> PassResult:
    graph = graph.edited()
    seen: dict[tuple, int] = {}
    fired: Counter = Counter()
    for n in list(nx.topological_sort(graph)):
        payload = graph.payload(n)
        if isinstance(payload, Save):
            continue
        key = (payload.key(), graph.inputs(n))
        if key in seen:
            graph.replace(n, seen[key])
            fired[key[0][0]] += 1
        else:
            seen[key] = n
    return PassResult(graph.freeze(), fired)
