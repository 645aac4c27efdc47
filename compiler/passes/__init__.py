"""Optimization passes: plain functions `pass(graph) -> PassResult`, run in the order of PASSES.

A pass never changes the graph it is given (graphs are frozen): it returns the graph it produced, what its
rules did (`mgc plan --explain` shows it), and, for the scheduling pass, the schedule.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..ir import Graph
from .eliminate_common_subexpressions import eliminate_common_subexpressions
from .eliminate_dead_nodes import eliminate_dead_nodes
from .fold_trivial_ops import fold_trivial_ops
from .result import PassResult
from .schedule_blocks import Schedule, schedule_blocks

PASSES: tuple[Callable[[Graph], PassResult], ...] = (
    eliminate_common_subexpressions,
    fold_trivial_ops,
    eliminate_common_subexpressions,
    eliminate_dead_nodes,
    schedule_blocks,
)


@dataclass
class PassReport:
    name: str
    before: dict[str, int]
    after: dict[str, int]
    fired: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Optimized:
    graph: Graph
    schedule: Schedule
    reports: list[PassReport]


def optimize(graph: Graph, passes=PASSES) -> Optimized:
    """Run `passes` in order. The schedule is the one computed for the final graph: the scheduling pass's,
    or, when the passes end without one, schedule_blocks' (not reported)."""
    graph = graph.freeze()
    reports = []
    schedule: Optional[Schedule] = None
    for p in passes:
        before = graph.counts()
        result = p(graph)
        if result.graph is not graph:
            schedule = None
        graph, schedule = result.graph, result.schedule or schedule
        reports.append(PassReport(p.__name__, before, graph.counts(), dict(Counter(result.fired))))
    if schedule is None:
        schedule = schedule_blocks(graph).schedule
    return Optimized(graph, schedule, reports)


__all__ = ["PASSES", "Optimized", "PassReport", "PassResult", "Schedule", "optimize", "eliminate_common_subexpressions",
           "eliminate_dead_nodes", "fold_trivial_ops", "schedule_blocks"]
