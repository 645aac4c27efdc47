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
from .share_task_vectors import share_task_vectors

PASSES: tuple[Callable[[Graph], Graph], ...] = (
    eliminate_common_subexpressions,
    fold_trivial_ops,
    eliminate_common_subexpressions,
    eliminate_dead_nodes,
    schedule_blocks,
)

_SHARE_TASK_VECTORS = share_task_vectors  # pipeline()'s keyword of the same name hides the function


def pipeline(*, share_task_vectors: bool = False) -> tuple[Callable[[Graph], Graph], ...]:
    """PASSES, with the opt-in ones asked for. ``share_task_vectors`` is opt-in because it trades memory for
    a subtraction: the shared float32 task vectors stay alive between their users, while the streaming
    operators fuse x − base into their slice loops for almost nothing (docs/performance.md measures it)."""
    if not share_task_vectors:
        return PASSES
    at = PASSES.index(eliminate_dead_nodes)
    return PASSES[:at] + (_SHARE_TASK_VECTORS,) + PASSES[at:]


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


__all__ = ["PASSES", "pipeline", "PassReport", "optimize", "eliminate_common_subexpressions", "eliminate_dead_nodes",
           "fold_trivial_ops", "schedule_blocks", "share_task_vectors"]
