"""The checker's file system work: opening the checkpoints model(...) names (local folders, or hf:// through
mgc.core.hub), each once with its layer map, and resolving the other paths a recipe names (fisher()'s data,
a save's folder) under one guard."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from mgc.core import hub
from mgc.core.adapter import refuse_as_checkpoint
from mgc.core.checkpoint import Checkpoint
from mgc.core.errors import CheckpointError, MgcError, Span
from mgc.core.paths import resolve_checkpoint_path

from . import fisher_cache
from .layers import layer_map
from .values import CheckpointModel, TensorSpec


class Inputs:
    """The checkpoints a recipe opened, by resolved path, and their layer maps."""

    def __init__(self, base_dir: Path, allow_pickle: bool):
        self.base_dir = base_dir
        self.allow_pickle = allow_pickle
        self.checkpoints: dict[Path, object] = {}
        self.layer_maps: dict[Path, object] = {}

    def model(self, text: str, span: Span, call_span: Span) -> CheckpointModel:
        """The value of `model("text")`; errors point at the string (`span`), the value at the call."""
        # only an explicit hf://org/name is fetched (mgc/core/hub.py); anything else is a local path
        if hub.looks_like_hub_id(text):
            # pinned to a commit; only config, index and shard headers are fetched (mgc/core/hub_checkpoint.py)
            path = hub.open_checkpoint(text, span, self.checkpoints).path
        else:
            path = resolve_checkpoint_path(text, self.base_dir, span)
            if not os.path.lexists(path):
                raise hub.not_found(text, self.base_dir, span)
            refuse_as_checkpoint(path, text, span)
        ckpt = self.checkpoints.get(path)
        if ckpt is None:
            try:
                ckpt = Checkpoint.open(path, allow_pickle=self.allow_pickle, span=span)
            except CheckpointError as err:
                if err.span is None:
                    err.span = span
                raise
            self.checkpoints[path] = ckpt
        tensors = {n: TensorSpec(i.shape, i.dtype) for n, i in ckpt.tensors.items()}
        if ckpt.path not in self.layer_maps:
            try:
                self.layer_maps[ckpt.path] = layer_map(ckpt.config, tensors, getattr(ckpt, "label", str(ckpt.path)))
            except CheckpointError as err:
                raise CheckpointError(err.message, span, err.hint) from None
        return CheckpointModel(ckpt, call_span, tensors, self.layer_maps[ckpt.path])


def resolve_path(text: str, base_dir: Path, role: str, error: type[MgcError], span: Span,
                 look: Callable[[Path], object] = lambda path: None) -> tuple[Path, object]:
    """`text`, ~ expanded, relative to `base_dir` and resolved, with what `look` finds there. A path that cannot
    be resolved or looked at (a NUL byte, a name too long, no permission) raises `error` at `span`."""
    try:
        path = (base_dir / os.path.expanduser(text)).resolve()
        return path, look(path)
    except (OSError, ValueError, RuntimeError) as err:
        raise error(f"cannot use '{text}' as {role}: {getattr(err, 'strerror', None) or err}", span) from None


def fisher_data(text: str, base_dir: Path, span: Span) -> tuple[Path, fisher_cache.DataInfo]:
    """The text file fisher()'s `data` names, and what the cache key needs of it."""
    path, (is_file, exists) = resolve_path(
        text, base_dir, "fisher()'s data", CheckpointError, span, lambda p: (p.is_file(), p.exists())
    )
    if not is_file:
        raise CheckpointError(
            f"no data file at '{text}'" if not exists else f"data '{text}' is not a file", span,
            f"{hub.looked_for(text, base_dir)}; fisher() reads a text file, documents separated by blank lines",
        )
    try:
        return path, fisher_cache.inspect_data(path)
    except MgcError as err:
        raise CheckpointError(err.message, span, err.hint) from None
