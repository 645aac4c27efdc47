"""The header of a safetensors file: read and checked as strictly as the safetensors library checks it, so
that a corrupt or crafted file is refused before any tensor is read."""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from mgc.core.dtypes import SAFETENSORS, DType, DTypeTable, keep_dtype
from mgc.core.errors import CheckpointError
from mgc.core.paths import regular_file_size
from mgc.core.strict_json import json_type, loads

DTYPES: dict[str, DType] = {d.code: d for d in SAFETENSORS}
DTYPE_CODES = DTypeTable({v: k for k, v in DTYPES.items()})  # also answers for torch's dtypes
MAX_HEADER = 100 * 1024 * 1024
# Sizes, offsets and element counts must fit torch's int64 sizes (safetensors itself allows up to 2**64 - 1).
MAX_COUNT = 2**63 - 1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: DType  # a torch dtype given (a pickle's tensor) is turned into its DType
    shape: tuple[int, ...]
    offset: int = -1  # where its bytes start in the file (safetensors); -1 for pickles

    def __post_init__(self) -> None:
        keep_dtype(self)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _is_count(value: object) -> bool:
    """A non-negative JSON integer that fits int64 (not a bool, a float or a string)."""
    return type(value) is int and 0 <= value <= MAX_COUNT


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header without reading its data."""
    size = regular_file_size(file)
    try:
        with open(file, "rb") as f:
            n = header_length(f.read(8), file, size)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise CheckpointError(f"{file}: truncated safetensors header (the file shrank while it was read)")
    return parse_header(raw, file, size)


def header_length(head: bytes, file: Path, size: int) -> int:
    """The header length that `head`, the first 8 bytes of a safetensors file of `size` bytes, declares, checked
    against the file's size (also for a file on the hub, whose bytes are fetched by range: see hub_header.py)."""
    if len(head) < 8:
        raise CheckpointError(f"{file}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors header ({n} bytes declared, file has {size})")
    if n == 0:
        raise CheckpointError(f"{file}: corrupt safetensors header (its size is 0)")
    return n


def parse_header(raw: bytes, file: Path, size: int) -> dict[str, TensorInfo]:
    """The tensors of a header's bytes `raw` (after the 8-byte length) in a file of `size` bytes, validated."""
    header = loads(raw, str(file), "the safetensors header", must_start="{")
    return validate_header(header, file, 8 + len(raw), size - 8 - len(raw))


def validate_header(header: object, file: Path, data_start: int, data_size: int) -> dict[str, TensorInfo]:
    """The tensors of a parsed safetensors header, checked as strictly as the safetensors library checks them.

    Every entry but `__metadata__` (an object of strings) is {"dtype", "shape", "data_offsets"}, with a
    known dtype, a list of non-negative integers for a shape, and [begin, end] integer offsets whose span
    holds exactly the shape's bytes; sorted by offset, the tensors tile the data region from 0 to its end,
    with no overlap, no gap and nothing after the last one. `data_start` is where the data region starts
    in the file, `data_size` its length.
    """
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object but {json_type(header)})")
    if "__metadata__" in header:
        meta = header["__metadata__"]
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(
                f"{file}: corrupt safetensors header: __metadata__ must be an object of strings, got {meta!r:.200}"
            )
    tensors: dict[str, TensorInfo] = {}  # in the header's order
    extents = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{file}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has a header entry that is {json_type(entry)}, not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise CheckpointError(f"{where} has a header entry without {', '.join(missing)}: {entry!r:.200}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise CheckpointError(
                f"{where} has an unknown or unsupported dtype {code!r:.40}", hint=f"mgc reads {', '.join(DTYPES)}"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where} has a shape that is not a list of non-negative integers: {shape!r:.200}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CheckpointError(
                f"{where} has data_offsets that are not two non-negative integers [begin, end]: {offsets!r:.200}"
            )
        begin, end = offsets
        if begin > end:
            raise CheckpointError(f"{where} has data_offsets [{begin}, {end}] that end before they begin")
        numel = 1
        for d in shape:  # checked as it goes, as safetensors does: [2**62, 4, 0] overflows before the 0
            numel *= d
            if numel > MAX_COUNT:
                raise CheckpointError(f"{where} has a shape {shape} whose element count overflows")
        dtype = DTYPES[code]
        nbytes = numel * dtype.itemsize
        if nbytes > MAX_COUNT:
            raise CheckpointError(f"{where} has a shape {shape} whose size in bytes overflows")
        tensors[name] = TensorInfo(name, file, dtype, tuple(shape), data_start + begin)
        extents.append((begin, end, name, code, nbytes))
    extents.sort(key=lambda s: (s[0], s[1]))  # as safetensors sorts them: by (begin, end)
    covered, previous = 0, None
    for begin, end, name, code, nbytes in extents:
        where = f"{file}: tensor '{name}'"
        if begin < covered:
            raise CheckpointError(
                f"{where} overlaps tensor '{previous}' (its bytes start at {begin}, before {covered}, where '{previous}' ends)",
                hint="a safetensors file's tensors must not share bytes: the file is corrupt or was crafted",
            )
        if begin > covered:
            raise CheckpointError(
                f"{where} starts at byte {begin} of the data, leaving bytes {covered}..{begin} that belong to no tensor",
                hint="a safetensors file's tensors must cover its data without gaps: the file is corrupt or was crafted",
            )
        if end > data_size:
            raise CheckpointError(
                f"{where} lies past the end of the file (truncated: needs {end} data bytes, has {data_size})"
            )
        if end - begin != nbytes:
            raise CheckpointError(
                f"{where} declares {code} {list(tensors[name].shape)} ({nbytes} bytes) but holds {end - begin} bytes"
            )
        covered, previous = end, name
    if covered != data_size:
        raise CheckpointError(
            f"{file}: data bytes {covered}..{data_size} belong to no tensor (the last tensor ends at {covered})",
            hint="a safetensors file ends where its last tensor does: the file is corrupt or was crafted",
        )
    return tensors
