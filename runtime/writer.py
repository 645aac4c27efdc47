"""A streaming, sharded safetensors writer.

The compiler knows every output tensor's name, shape and dtype before any is
computed, so shard boundaries and each file's header are fixed up front; each
tensor is then written straight to its offset as soon as it is ready and freed.
Memory stays bounded by the tensors in flight, not by the shard size.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from mgc.core.checkpoint import INDEX_FILE
from mgc.core.safetensors_header import DTYPE_CODES

from .journal import Entry, Journal


@dataclass(frozen=True)
class Slot:
    file: str
    begin: int
    end: int


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize  # a DType (mgc/core/dtypes.py) or a torch dtype


def plan_shards(tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int) -> list[list[tuple]]:
    """Split tensors, in the given order, into shards of at most shard_bytes (a larger tensor gets its own)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype))
        size += n
    return shards if shards[0] else []


class ShardedWriter:
    def __init__(self, folder: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int,
                 metadata: Optional[dict[str, str]] = None, first_only: Optional[dict[str, str]] = None,
                 mode: str = "create"):
        """`metadata` goes into every shard's `__metadata__`; `first_only` into the first shard's only, and every
        other shard names that shard under `mgc.recipe_in` (runtime/provenance.py). Values must be strings.

        `mode`: "create" writes every shard's header and sets its size; "resume" does the same over the files an
        interrupted run left (their tensor bytes stay); "attach" writes neither, for a rank that writes its tensors
        into shards rank 0 made (runtime/distributed.py). A rank's files are opened as it first writes to them."""
        self.folder = folder
        for key, value in {**(metadata or {}), **(first_only or {})}.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"safetensors metadata must map strings to strings: {key!r}")
        shards = plan_shards(tensors, shard_bytes)
        count = len(shards)
        self.slots: dict[str, Slot] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.files: dict[str, object] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.sharded = count > 1
        self.journal: Optional[Journal] = None  # set where the run may be resumed
        names = [f"model-{k:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
                 for k in range(1, count + 1)]
        for k, shard in enumerate(shards, 1):
            fname = names[k - 1]
            meta = {"format": "pt", **(metadata or {})}
            if first_only:
                meta.update(first_only if k == 1 else {"mgc.recipe_in": names[0]})
            header, offset = {"__metadata__": meta}, 0
            for name, shape, dtype in shard:
                n = _nbytes(shape, dtype)
                header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                self.dtypes[name] = dtype
                self.weight_map[name] = fname
                offset += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            data_start = 8 + len(raw)
            for name, shape, dtype in shard:
                begin, end = header[name]["data_offsets"]
                self.slots[name] = Slot(fname, data_start + begin, data_start + end)
            if mode != "attach":
                path = folder / fname
                f = self.files[fname] = open(path, "r+b" if mode == "resume" and path.is_file() else "wb")
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                f.truncate(data_start + offset)
            self.total_size += offset
        self.pending = set(self.slots)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        part = self.stream(name)
        part.write(tensor)
        part.close()

    def stream(self, name: str) -> "TensorStream":
        """A writer of tensor `name`'s bytes in order, a part at a time (runtime/streamed.py)."""
        return TensorStream(self, name)

    def _file(self, fname: str):
        f = self.files.get(fname)
        if f is None:
            f = self.files[fname] = open(self.folder / fname, "r+b")
        return f

    def close(self, index: bool = True) -> None:
        """Close the journal and the files, check that every tensor expected was written and (`index`) write the
        index of a sharded output."""
        if self.journal is not None:
            self.journal.close()
        for f in self.files.values():
            f.close()
        self.files = {}
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} tensors were never written, e.g. '{next(iter(self.pending))}'")
        if self.sharded and index:
            doc = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(doc, indent=2) + "\n")

    def abort(self) -> None:
        if self.journal is not None:
            try:
                self.journal.close()
            except OSError:
                pass  # an fsync that failed: its tensors are simply not journaled
        for f in self.files.values():
            f.close()
        self.files = {}


class TensorStream:
    """One tensor's bytes written in order, part by part; journaled (with the crc32 of all its bytes) and counted
    as written once the last byte is."""

    def __init__(self, writer: ShardedWriter, name: str):
        self.writer, self.name = writer, name
        self.slot = writer.slots[name]
        self.dtype = writer.dtypes[name]
        self.done = 0
        self.crc = 0

    def write(self, part: torch.Tensor) -> None:
        if part.dtype != self.dtype:
            raise ValueError(f"tensor '{self.name}' is {part.dtype}, expected {self.dtype}")
        data = part.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        size = self.slot.end - self.slot.begin
        if self.done + data.nbytes > size:
            raise ValueError(f"tensor '{self.name}' has more than {size} bytes")
        f = self.writer._file(self.slot.file)
        f.seek(self.slot.begin + self.done)
        f.write(memoryview(data))
        self.crc = zlib.crc32(memoryview(data), self.crc)
        self.done += data.nbytes

    def close(self) -> None:
        size = self.slot.end - self.slot.begin
        if self.done != size:
            raise ValueError(f"tensor '{self.name}' has {self.done} bytes, expected {size}")
        if self.writer.journal is not None:
            entry = Entry(self.name, self.slot.file, self.slot.begin, size, self.crc)
            self.writer.journal.wrote(entry, self.writer._file(self.slot.file))
        self.writer.pending.discard(self.name)
