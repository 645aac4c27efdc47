"""Compute a task vector once when several task-vector operations read it.

    a = ties(e1, e2, base = b)          t1 = task_vector(e1, base = b)
    c = dare_ties(e1, e2, base = b)  -> t2 = task_vector(e2, base = b)
                                        a = ties(t1, t2, base = b) on task vectors
                                        c = dare_ties(t1, t2, base = b) on task vectors

Each operation whose operator has ``merge_deltas`` computes δ = x − base for each of its models. Where a
(base, model) pair is read by two or more such operations (or by one and a ``task_vector`` already in
the graph), one ``task_vector`` node computes it, and every operation reading a shared pair takes all of
its models as task vectors (``Apply.deltas``), so the runtime calls its ``merge_deltas``. The results are
the same bytes: ``merge`` is ``merge_deltas`` of the same float32 differences.
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict

import networkx as nx

from mgc.stdlib import OPERATORS
from mgc.stdlib.task_vector import Params as TaskVectorParams

from ..ir import Apply, Graph


def _takes_deltas(p) -> bool:
    return isinstance(p, Apply) and p.has_base and not p.deltas and OPERATORS[p.op].merge_deltas is not None


def _is_task_vector(p) -> bool:
    return isinstance(p, Apply) and p.op == "task_vector" and not p.deltas


def share_task_vectors(graph: Graph) -> Graph:
    fired: Counter = Counter()
    order = list(nx.topological_sort(graph))
    vectors: dict[tuple[int, int], int] = {}  # (base, model) -> its task_vector node
    users: dict[tuple[int, int], set[int]] = defaultdict(set)
    consumers: list[tuple[int, int, list[int]]] = []
    for n in order:
        p = graph.payload(n)
        if _is_task_vector(p):
            pair = tuple(graph.inputs(n))
            vectors.setdefault(pair, n)
            users[pair].add(n)
        elif _takes_deltas(p):
            base, models, _ = p.split(list(graph.inputs(n)))
            consumers.append((n, base, models))
            for m in models:
                users[(base, m)].add(n)
    rewritable = {n for n, _, _ in consumers}
    shared = {pair for pair, who in users.items() if len(who) >= 2 and who & rewritable}
    for n, base, models in consumers:
        if not any((base, m) in shared for m in models):
            continue
        p = graph.payload(n)
        deltas = []
        for m in models:
            if (base, m) not in vectors:
                payload = Apply("task_vector", TaskVectorParams(), True, p.tensor, p.shape, p.span)
                vectors[(base, m)] = graph.add(payload, (base, m))
            deltas.append(vectors[(base, m)])
        aux_inputs = graph.inputs(n)[1 + len(models):]
        graph.set_inputs(n, (base, *deltas, *aux_inputs))
        graph.nodes[n]["node"] = dataclasses.replace(p, deltas=True)
        fired["merge_on_task_vectors"] += 1
    fired["shared_task_vector"] = len(shared)
    graph.graph.setdefault("fired", {})["share_task_vectors"] = +fired
    return graph
