"""Replace operations whose result is one of their inputs by that input.

A table of named rules, each `rule(payload, inputs) -> index of the input that is the
result, or None`; applied to every apply node in topological order, so folds cascade.

    slerp(a, b, t = 0)  -> a          linear(a)  -> a   (weight 1, or normalized by its own weight 1)
    slerp(a, b, t = 1)  -> b          karcher(a) -> a   (without Fisher weights)
    passthrough(a, scale = 1) -> a

Only identities that the operator computes exactly are rules: the folded graph writes the bytes the
unfolded one would. `linear(a, a)` is mathematically a, but (0.3·a + 0.7·a) is not a in float32,
and `linear(a, weights = [3])` computes (3·a)/3: neither is folded.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import networkx as nx

from ..ir import Apply, Graph

Rule = Callable[[Apply, tuple], Optional[int]]

def _slerp_t0(p: Apply, inputs: tuple) -> Optional[int]:
    return 0 if p.op == "slerp" and p.params.t == 0 else None


def _slerp_t1(p: Apply, inputs: tuple) -> Optional[int]:
    return 1 if p.op == "slerp" and p.params.t == 1 else None


def _single_source(p: Apply, inputs: tuple) -> Optional[int]:
    if len(inputs) != 1:
        return None
    if p.op == "karcher" and not p.aux:  # karcher of one model copies it (after checking its Fisher weights)
        return 0
    if p.op == "linear" and (p.params.weights or [1.0])[0] == 1.0:  # 1·x, or 1·x / 1
        return 0
    return None


def _identity_passthrough(p: Apply, inputs: tuple) -> Optional[int]:
    return 0 if p.op == "passthrough" and p.params.scale == 1 else None


RULES: tuple[tuple[str, Rule], ...] = (
    ("slerp_t0", _slerp_t0),
    ("slerp_t1", _slerp_t1),
    ("single_source", _single_source),
    ("identity_passthrough", _identity_passthrough),
)


def fold_trivial_ops(graph: Graph) -> Graph:
    fired: Counter = Counter()
    for n in list(nx.topological_sort(graph)):
        payload = graph.payload(n)
        if not isinstance(payload, Apply):
            continue
        inputs = graph.inputs(n)
        for name, rule in RULES:
            index = rule(payload, inputs)
            if index is not None:
                graph.replace(n, inputs[index])
                fired[name] += 1
                break
    graph.graph.setdefault("fired", {})["fold_trivial_ops"] = fired
    return graph
