"""A safetensors header on the hub, read without its tensors: two range reads, the 8-byte length and then the header
itself, checked by the same code as a local file's header (safetensors_header.py), against the file size the server
reports. A shard already in the hub cache is read locally instead."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mgc.core.errors import CheckpointError
from mgc.core.hub_client import Revision, read_range
from mgc.core.paths import regular_file_size
from mgc.core.safetensors_header import TensorInfo, header_length, parse_header, read_header


def remote_header(rev: Revision, filename: str, label: str) -> tuple[dict[str, TensorInfo], int]:
    """The tensors of `filename` at the pinned commit and the file's size. The tensors' `file` is where the file
    lies once downloaded (the commit's folder in the hub cache), so that reads need no other map."""
    local = rev.snapshot / filename
    if local.is_file():
        with _hint(f"the copy in the hub cache is damaged: remove {local.resolve()} and run again"):
            return read_header(local), regular_file_size(local)
    head, size = read_range(rev, filename, 0, 8, label)
    if size is None:
        raise CheckpointError(
            f"{local}: the hub did not report the file's size", hint="is HF_ENDPOINT a Hugging Face hub?"
        )
    with _hint("the file on the hub is damaged or not a safetensors file: tell the repository's owner, "
               "or name another revision with @"):
        n = header_length(head, local, size)
        raw, _ = read_range(rev, filename, 8, n, label)
        if len(raw) != n:
            raise CheckpointError(f"{local}: truncated safetensors header (the hub sent {len(raw)} of its {n} bytes)")
        return parse_header(raw, local, size), size


@contextmanager
def _hint(hint: str) -> Iterator[None]:
    """A CheckpointError raised inside without a hint gets this one."""
    try:
        yield
    except CheckpointError as err:
        err.hint = err.hint or hint
        raise


@contextmanager
def relabel(folder: Path, label: str) -> Iterator[None]:
    """A CheckpointError raised inside names the repository (`label`, as the recipe wrote it) instead of the hub
    cache folder that stands for it."""
    try:
        yield
    except CheckpointError as err:
        err.message = err.message.replace(str(folder), label)
        err.args = (err.message,)
        raise
