"""Which operations run streamed: merged from the input files into the output's shard a slice at a time, holding
none of their tensors whole (runtime/streamed.py). The plan's memory estimate and the runtime ask the same rule.

An operation streams when, on the CPU, its operator streams for its parameters (Operator.streams_with), it applies
no offset, every input is a tensor of a safetensors checkpoint, its only user is one save into a checkpoint (not a
LoRA adapter), and its whole-tensor footprint (inputs as stored, result, working memory) is STREAM_BYTES or more:
below that, reading whole is faster (one read per input, and no second pass of an operator that reads twice).
"""
from __future__ import annotations

import math
import os

from mgc.stdlib import RUNNABLE

from .ir import Apply, Graph, Load, Save

STREAM_BYTES = 256 << 20


def stream_bytes() -> int:
    """STREAM_BYTES, or MGC_STREAM_BYTES where set (tests stream every tensor with 0)."""
    raw = os.environ.get("MGC_STREAM_BYTES")
    return int(raw) if raw and raw.isdigit() else STREAM_BYTES


def streamed_applies(graph: Graph, order, program, device_type: str = "cpu") -> set[int]:
    """The apply nodes of `order` that run streamed, for the checked `program` (its checkpoints and saves)."""
    if device_type != "cpu":
        return set()
    threshold = stream_bytes()
    adapters = {s.path for s in program.saves if getattr(s, "adapter", None) is not None}
    chosen = set()
    for n in order:
        p = graph.payload(n)
        if not isinstance(p, Apply) or p.offset or not RUNNABLE[p.op].streams_with(p.params, bool(p.aux)):
            continue
        loads = [graph.payload(i) for i in graph.inputs(n)]
        ckpts = [program.checkpoints.get(x.checkpoint) if isinstance(x, Load) else None for x in loads]
        if not all(c is not None and not c.pickled for c in ckpts):  # a fisher() cache is opened at run time
            continue
        users = list(graph.successors(n))
        save = graph.payload(users[0]) if len(users) == 1 else None
        if not isinstance(save, Save) or save.output in adapters:
            continue
        whole = sum(x.nbytes for x in loads) + save.nbytes
        if whole + RUNNABLE[p.op].transient(math.prod(p.shape), len(loads), bool(p.aux)) >= threshold:
            chosen.add(n)
    return chosen


def read_by_streams_only(graph: Graph, order, streamed: set[int]) -> set[int]:
    """The load nodes of `order` whose every user in it runs streamed: they are never read whole."""
    if not streamed:
        return set()
    mine = set(order)
    return {n for n in order if isinstance(graph.payload(n), Load)
            and all(u in streamed for u in graph.successors(n) if u in mine)}
