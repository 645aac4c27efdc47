"""What a plan reads of hub checkpoints (hf://): the shards holding tensors it loads, for `mgc plan` to show and for
the runtime to download before a run (runtime/hub_fetch.py)."""
from __future__ import annotations

from mgc.core.hub_checkpoint import RemoteCheckpoint

from .ir import Load


def hub_loads(plan) -> dict[RemoteCheckpoint, list[str]]:
    """The hub checkpoints the plan reads, with the tensors it reads of each."""
    wanted: dict[RemoteCheckpoint, list[str]] = {}
    for n in plan.graph.of_kind(Load):
        p = plan.graph.payload(n)
        ckpt = plan.program.checkpoints.get(p.checkpoint)
        if isinstance(ckpt, RemoteCheckpoint):
            wanted.setdefault(ckpt, []).append(p.tensor)
    return wanted


def hub_lines(plan) -> list[str]:
    """Lines for a plan summary: for each hub checkpoint, its commit and the shards a run downloads."""
    from .plan import format_bytes

    lines = []
    for ckpt, names in hub_loads(plan).items():
        shards = ckpt.shards_for(names)
        todo = ckpt.missing(shards)
        lines.append(
            f"  {ckpt.label}  commit {ckpt.revision.sha[:12]}: reads {len(shards)} of {len(ckpt.sizes)} shards, "
            + (f"{len(todo)} to download ({format_bytes(sum(ckpt.sizes[s] for s in todo))})" if todo else "all cached")
        )
    return (["", "hub (mgc run downloads only the shards it reads):"] + lines) if lines else []
