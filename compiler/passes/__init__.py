"""Optimization passes: plain functions `pass(graph) -> graph`, run in the order of PASSES.

A pass may record what it did in ``graph.graph["fired"][pass_name]`` (a Counter of rule names);
`mgc plan --explain` shows it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..ir import Graph
from .eliminate_common_subexpressions import eliminate_common_subexpressions
from .eliminate_dead_nodes import eliminate_dead_nodes
from .fold_trivial_ops import fold_trivial_ops
from .schedule_blocks import schedule_blocks

PASSES: tuple[Callable[[Graph], Graph], ...] = (
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


def optimize(graph: Graph, passes=PASSES) -> list[PassReport]:
    reports = []
    for p in passes:
        before = graph.counts()
        graph.graph.setdefault("fired", {}).pop(p.__name__, None)
        p(graph)
        reports.append(PassReport(p.__name__, before, graph.counts(), dict(graph.graph["fired"].get(p.__name__, {}))))
    return reports


__all__ = ["PASSES", "PassReport", "optimize", "eliminate_common_subexpressions", "eliminate_dead_nodes",
           "fold_trivial_ops", "schedule_blocks"]
