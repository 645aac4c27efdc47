"""Which operations run streamed: merged from the input files into the output's shard a slice at a time, holding
none of their tensors whole (runtime/streamed.py). The plan's memory estimate and the runtime ask the same rule.

An operation streams when, on the CPU, its operator streams for its parameters (Operator.streams_with), it applies
no offset, every input is a tensor of a safetensors checkpoint, its only user is one save into a checkpoint (not a
LoRA adapter), and its whole-tensor footprint (inputs as stored, result, working memory) is STREAM_BYTES or more:
below that, reading whole is faster (one read per input, and no second pass of an operator that reads twice). A
save of an input tensor as it is (or cast) of STREAM_BYTES or more is copied a slice at a time, on any device.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from mgc.stdlib import RUNNABLE

from .ir import Apply, Graph, Load, Save

STREAM_BYTES = 256 << 20


def stream_bytes() -> int:
    """STREAM_BYTES, or MGC_STREAM_BYTES where set (tests stream every tensor with 0)."""
    raw = os.environ.get("MGC_STREAM_BYTES")
    return int(raw) if raw and raw.isdigit() else STREAM_BYTES


@dataclass(frozen=True)
class Streaming:
    """What a run does a slice at a time: apply nodes merged from the files into their save, save nodes that copy a
    load (an input tensor kept, perhaps cast), and the loads that are therefore never read whole."""

    applies: frozenset = frozenset()
    copies: frozenset = frozenset()
    unread: frozenset = frozenset()


def streaming(graph: Graph, order, program, device_type: str = "cpu") -> Streaming:
    """What runs streamed among the nodes of `order`, for the checked `program` (its checkpoints and saves)."""
    threshold = stream_bytes()
    adapters = {s.path for s in program.saves if getattr(s, "adapter", None) is not None}

    def readable(x) -> bool:  # a tensor of a safetensors checkpoint (a fisher() cache is opened at run time)
        ckpt = program.checkpoints.get(x.checkpoint) if isinstance(x, Load) else None
        return ckpt is not None and not ckpt.pickled

    applies, copies = set(), set()
    for n in order:
        p = graph.payload(n)
        if isinstance(p, Save):  # a copy: its bytes pass through the CPU on any device
            source = graph.payload(graph.inputs(n)[0])
            if p.output not in adapters and readable(source) and source.nbytes + p.nbytes >= threshold:
                copies.add(n)
            continue
        if device_type != "cpu" or not isinstance(p, Apply) or p.offset:
            continue
        op = RUNNABLE[p.op]
        if not op.streams_with(p.params, bool(p.aux)):
            continue
        loads = [graph.payload(i) for i in graph.inputs(n)]
        users = list(graph.successors(n))
        save = graph.payload(users[0]) if len(users) == 1 else None
        if not all(map(readable, loads)) or not isinstance(save, Save) or save.output in adapters:
            continue
        whole = sum(x.nbytes for x in loads) + save.nbytes
        if whole + op.transient(math.prod(p.shape), len(loads), bool(p.aux)) >= threshold:
            applies.add(n)
    users_streamed = applies | copies
    mine = set(order)
    unread = {n for n in order if isinstance(graph.payload(n), Load)
              and all(u in users_streamed for u in graph.successors(n) if u in mine)}
    copies = {n for n in copies if graph.inputs(n)[0] in unread}  # a load read whole anyway is saved from memory
    return Streaming(frozenset(applies), frozenset(copies), frozenset(unread))
