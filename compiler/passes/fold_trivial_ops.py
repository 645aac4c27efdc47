"""Replace operations whose result is one of their inputs by that input.

Each operator declares its identities (`Operator.identity`: which model input its result is, for
given parameters); they are applied to every apply node in topological order, so folds cascade.

    slerp(a, b, t = 0)  -> a          linear(a)  -> a   (weight 1, or normalized by its own weight 1)
    slerp(a, b, t = 1)  -> b          karcher(a) -> a   (without Fisher weights)
    passthrough(a, scale = 1) -> a

Only identities that the operator computes exactly are rules: the folded graph writes the bytes the
unfolded one would. `linear(a, a)` is mathematically a, but (0.3·a + 0.7·a) is not a in float32,
and `linear(a, weights = [3])` computes (3·a)/3: neither is folded.
"""
from __future__ import annotations

from collections import Counter

import networkx as nx

from mgc.stdlib import RUNNABLE

from ..ir import Apply, Graph
from .result import PassResult


def fold_trivial_ops(graph: Graph) -> PassResult:
    graph = graph.edited()
    fired: Counter = Counter()
    for n in list(nx.topological_sort(graph)):
        payload = graph.payload(n)
        if not isinstance(payload, Apply):
            continue
        identity = RUNNABLE[payload.op].identity
        _, models, _ = payload.split(list(graph.inputs(n)))
        found = identity(payload.params, len(models), bool(payload.aux)) if identity is not None else None
        if found is not None:
            index, rule = found
            graph.replace(n, models[index])
            fired[rule] += 1
    return PassResult(graph.freeze(), fired)
