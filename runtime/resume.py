"""Resuming an interrupted run: the run key that says whether a staging folder a dead run left holds this run's
output, and the choice of folder to continue (runtime/journal.py records what is in it).

The key hashes everything the bytes written depend on: mgc's version, the device type, each saved tensor's
computation (its graph node's meaning: payload keys down to the loads), the shard layout and the header
metadata (the recipe's text, the inputs' header hashes), and the size and modification time of every input file
the output reads. A run whose key differs starts afresh, and says so.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from mgc.compiler.ir import Graph, Load, Save

from .journal import read_entries, read_key

FORMAT = "mgc-resume-1"


def node_hashes(graph: Graph, order) -> dict[int, bytes]:
    """A digest of each node's meaning (compiler/ir.py's `meanings`), computed once per node."""
    out: dict[int, bytes] = {}
    for n in order:
        h = hashlib.blake2b(repr(graph.payload(n).key()).encode(), digest_size=16)
        for i in graph.inputs(n):
            h.update(out[i])
        out[n] = h.digest()
    return out


def run_key(plan, save, tensors, metadata, device_type: str, hashes: dict[int, bytes], version: str) -> str:
    """The key of one (non-adapter) save's output: see the module's docstring."""
    graph = plan.graph
    h = hashlib.blake2b(digest_size=20)
    text = json.dumps([FORMAT, version, device_type, save.shard_bytes, metadata,
                       [(name, list(shape), str(dtype)) for name, shape, dtype in tensors]], sort_keys=True)
    h.update(text.encode())
    saves = sorted((graph.payload(n).tensor, n) for n in graph.of_kind(Save) if graph.payload(n).output == save.path)
    loads = set()
    for _, n in saves:
        h.update(hashes[n])
        todo = [n]
        while todo:
            m = todo.pop()
            p = graph.payload(m)
            if isinstance(p, Load):
                loads.add(p.checkpoint)
            todo.extend(graph.inputs(m))
    for path in sorted(loads):
        ckpt = plan.program.checkpoints[path]
        for f in sorted(str(f) for f in getattr(ckpt, "files", ()) or ()):
            try:
                st = os.stat(f)
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()


def adoptable(target: Path, key: str, note: Callable[[str], None]) -> Callable[[Path], bool]:
    """For clean_stale: whether a dead run's staging folder of `target` can be continued (its journals have this
    key and name a tensor at least). One with another key is said to be left for a fresh start."""

    def check(staging: Path) -> bool:
        found = read_key(staging)
        if found is None:
            return False
        if found != key:
            note(f"starting '{target}' afresh: the interrupted run that left '{staging.name}' had another recipe, "
                 "other inputs or other options")
            return False
        return bool(read_entries(staging))

    return check
