"""Before a run: the shards of hub checkpoints (hf://) that hold tensors the plan loads, downloaded into the hub cache
at the commit pinned when the recipe was checked, and the small files the saves copy from them. Shards the plan
does not read are never downloaded. Done before any output is staged, so a failed download leaves nothing behind."""
from __future__ import annotations

import sys

from mgc.compiler.hub_plan import hub_loads
from mgc.compiler.plan import format_bytes
from mgc.core.hub_checkpoint import RemoteCheckpoint


def fetch_hub_inputs(plan, progress: bool = False) -> None:
    for ckpt, names in hub_loads(plan).items():
        shards = ckpt.shards_for(names)
        todo = ckpt.missing(shards)
        if progress and todo:
            size = sum(ckpt.sizes[s] for s in todo)
            print(f"fetching {len(todo)} of {len(ckpt.sizes)} shards of {ckpt.label} ({format_bytes(size)}, "
                  f"commit {ckpt.revision.sha[:12]})", file=sys.stderr)
        ckpt.fetch(names, progress=progress)
    for save in plan.program.saves:
        source = getattr(save.model.config_source, "checkpoint", None)
        if isinstance(source, RemoteCheckpoint):
            source.fetch_extras()
        if save.tokenizer is not None and isinstance(save.tokenizer.checkpoint, RemoteCheckpoint):
            save.tokenizer.checkpoint.tokenizer_files()
