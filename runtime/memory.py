"""Run a plan into memory: its saved tensors as a state dict, with no checkpoint written (`mgc search`'s trials).

A node's meaning is its payload's key and its inputs' meanings (compiler/ir.py `meanings`), the same in every plan of a recipe
whose free parameters take other values: the part of the graph that does not depend on them has the same meanings
in every trial. A `TensorCache` keeps the values of chosen meanings (compiler/search_plan.py chooses them) across
trials, within a byte budget, so that each trial computes only what its values change.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from mgc.compiler.ir import Apply, Graph, Load, Rows, Save, meanings
from mgc.core.devices import resolve_device
from .apply import run_apply
from .execute import _cast_for_save, _reader
from .rows import run_rows


@dataclass
class TensorCache:
    """Values kept across runs, by meaning: only those in `keep`, while they fit in `budget` bytes."""

    keep: frozenset = frozenset()
    budget: Optional[int] = None
    values: dict[tuple, torch.Tensor] = field(default_factory=dict)
    held: int = 0

    def get(self, meaning: tuple) -> Optional[torch.Tensor]:
        return self.values.get(meaning)

    def offer(self, meaning: tuple, value: torch.Tensor) -> None:
        if meaning not in self.keep or meaning in self.values:
            return
        size = value.numel() * value.element_size()
        if self.budget is not None and self.held + size > self.budget:
            return
        self.values[meaning] = value
        self.held += size


@dataclass
class MemoryRun:
    tensors: dict[str, torch.Tensor]
    computed: Counter  # by kind: "load", and each operator's name, of the nodes this run computed
    reused: int  # nodes whose value came from the cache


def run_in_memory(plan, cache: Optional[TensorCache] = None, device: str = "auto") -> MemoryRun:
    """The plan's single save as {tensor name: tensor in the saved dtype}, computed on `device` (results stay
    there), reading values from `cache` and offering it what it keeps."""
    cache = cache or TensorCache()
    graph: Graph = plan.graph
    dev = resolve_device(device)
    saves = graph.of_kind(Save)
    mean = meanings(graph)
    # what the saves read, not looking past a value the cache holds
    need = graph.needed(saves, lambda n: isinstance(graph.payload(n), Save) or cache.get(mean[n]) is None)
    uses = Counter(i for n in need for i in graph.inputs(n))
    values: dict[int, torch.Tensor] = {}
    computed: Counter = Counter()
    reused = 0
    out: dict[str, torch.Tensor] = {}
    checkpoints = plan.program.checkpoints
    for n in plan.schedule.order:
        if n not in need:
            continue
        p = graph.payload(n)
        hit = cache.get(mean[n]) if not isinstance(p, Save) else None
        if hit is not None:
            values[n] = hit
            reused += 1
        elif isinstance(p, Load):
            values[n] = _reader(checkpoints, p)()
            computed["load"] += 1
        elif isinstance(p, Apply):
            values[n] = run_apply(p, [values[i] for i in graph.inputs(n)], dev)
            computed[p.op] += 1
        elif isinstance(p, Rows):
            values[n] = run_rows(p, [values[i] for i in graph.inputs(n)], dev)
            computed["rows"] += 1
        elif isinstance(p, Save):
            src = graph.inputs(n)[0]
            out[p.tensor] = _cast_for_save(values[src], p, graph.payload(src)).to(dev)
        if n in values and not isinstance(p, Save):
            cache.offer(mean[n], values[n])
        for i in graph.inputs(n):
            uses[i] -= 1
            if uses[i] == 0:
                values.pop(i, None)
    return MemoryRun(out, computed, reused)
