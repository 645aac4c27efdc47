"""Fuse nested weighted sums into one, so the inner sum is never materialised.

    linear(linear(a, b), c)  ->  linear(a, b, c) with the product weights

An inner linear is fused only when the outer one is its sole user, so no work is duplicated.
"""
from __future__ import annotations

from collections import Counter

import networkx as nx

from mgc.stdlib.linear import Params as LinearParams

from ..ir import Apply, Graph


def _coefficients(p: Apply, n: int) -> list[float]:
    weights = p.params.weights or [1.0] * n
    if p.params.normalize:
        total = sum(weights)
        return [w / total for w in weights]
    return list(weights)


def fuse_linear(graph: Graph) -> Graph:
    fired: Counter = Counter()
    for n in list(nx.topological_sort(graph)):
        p = graph.payload(n)
        if not (isinstance(p, Apply) and p.op == "linear"):
            continue
        inputs = graph.inputs(n)
        terms: dict[int, float] = {}
        fused = False
        for i, c in zip(inputs, _coefficients(p, len(inputs))):
            q = graph.payload(i)
            users = [u for u in graph.successors(i) for x in graph.inputs(u) if x == i]
            if isinstance(q, Apply) and q.op == "linear" and len(users) == 1:
                for j, d in zip(graph.inputs(i), _coefficients(q, len(graph.inputs(i)))):
                    terms[j] = terms.get(j, 0.0) + c * d
                fused = True
            else:
                terms[i] = terms.get(i, 0.0) + c
        if not fused:
            continue
        params = LinearParams(weights=list(terms.values()), normalize=False)
        m = graph.add(Apply("linear", params, False, p.tensor, p.shape, p.span), terms.keys())
        old_inputs = set(inputs)
        graph.replace(n, m)
        graph.remove_nodes_from([i for i in old_inputs if graph.out_degree(i) == 0 and isinstance(graph.payload(i), Apply)])
        fired["linear_of_linear"] += 1
    graph.graph.setdefault("fired", {})["fuse_linear"] = fired
    return graph
