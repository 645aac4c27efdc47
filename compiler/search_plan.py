"""What `mgc search` computes once: the part of a recipe's graph that no free parameter changes.

The plan at the domains' defaults and, for each domain, a plan with that domain at another value (the others at
their defaults, so that each plan is one the check has passed) are compared by node meaning (compiler/ir.py
`meanings`): a meaning that every plan has does not depend on the free parameters. Of those, the ones a
trial reads are kept across trials: inputs of nodes that depend on the values, and the final tensors that do not.
Only computed values are kept (merge results, vocabulary alignments), not loaded tensors, which a trial reads
again (from the page cache) rather than hold every input model in memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .ir import Apply, Graph, Rows, Save, meanings
from .search_space import Domain


@dataclass(frozen=True)
class Invariant:
    keep: frozenset  # meanings to keep across trials
    keep_bytes: int  # their size, at the dtype a run produces them (float32 for merge results)
    tensors_fixed: int  # saved tensors that no free parameter changes
    tensors: int


def other_values(domains: dict[tuple[int, int], Domain]) -> dict[tuple[int, int], float]:
    """A value apart from its default for each domain: a third of the way up its range (on a log scale where
    the domain is), or its second choice."""
    out = {}
    for key, d in domains.items():
        if d.choices:
            if len(d.choices) > 1:
                out[key] = d.choices[1] if d.default == d.choices[0] else d.choices[0]
        elif d.log:
            out[key] = math.exp(math.log(d.low) + (math.log(d.high) - math.log(d.low)) / 3)
        else:
            out[key] = d.low + (d.high - d.low) / 3
    return out


def invariant(a: Graph, *others: Graph) -> Invariant:
    """What plans of one recipe at different values of its free parameters share (`a`'s nodes are the ones kept)."""
    ma = meanings(a)
    fixed = set(ma.values())
    for b in others:
        fixed &= set(meanings(b).values())
    keep: dict[tuple, int] = {}
    saves = a.of_kind(Save)
    for n in a.nodes:
        if ma[n] in fixed:
            continue
        for i in a.inputs(n):
            if ma[i] in fixed and _computed(a, i):
                keep[ma[i]] = _nbytes(a, i)
    fixed_saves = 0
    for s in saves:
        src = a.inputs(s)[0]
        if ma[src] in fixed:
            fixed_saves += 1
            if _computed(a, src):
                keep[ma[src]] = _nbytes(a, src)
    return Invariant(frozenset(keep), sum(keep.values()), fixed_saves, len(saves))


def _computed(g: Graph, n: int) -> bool:
    return isinstance(g.payload(n), (Apply, Rows))


def _nbytes(g: Graph, n: int) -> int:
    return g.payload(n).nbytes


def plan_lines(shared: Invariant, free: int) -> list[str]:
    """What `mgc plan` says of a recipe with free parameters."""
    return [
        "", f"search ({free} free parameter{'s' if free != 1 else ''}):",
        f"  tensors fixed   {shared.tensors_fixed} of {shared.tensors} saved tensors do not depend on the free parameters",
        f"  kept            {len(shared.keep)} computed tensors ({shared.keep_bytes / 2**20:.1f} MiB at most), computed "
        "in the first trial of `mgc search` and reused by the others",
    ]
