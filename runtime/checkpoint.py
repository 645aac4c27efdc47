"""Hugging Face checkpoint folders: config, tensor index from safetensors headers, lazy reads.

Opening a checkpoint reads only config.json and each shard's header (parsed and validated
here); tensor data is read on demand, one tensor at a time, straight into its own buffer.
Pickle (`.bin`) checkpoints are refused unless the caller allows them.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mgc.compiler.errors import CheckpointError, Span

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = -1  # where its bytes start in the file (safetensors); -1 for pickles

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header without reading its data."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors header ({n} bytes declared, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor '{name}' has an unreadable header entry: {entry!r}") from None
        info = TensorInfo(name, file, dtype, shape, 8 + n + begin)
        if end > data_size:
            raise CheckpointError(
                f"{file}: tensor '{name}' lies past the end of the file (truncated: needs {end} data bytes, has {data_size})"
            )
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{file}: tensor '{name}' declares {entry['dtype']} {list(shape)} ({info.nbytes} bytes) but holds {end - begin} bytes"
            )
        tensors[name] = info
    return tensors


class Checkpoint:
    """A checkpoint folder: config.json plus safetensors shards (or, if allowed, pickle files)."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, TensorInfo], files: list[Path], pickled: bool):
        self.path = path
        self.config = config
        self.tensors = tensors
        self.files = files
        self.pickled = pickled
        self._handles: dict[Path, object] = {}
        self._state: Optional[dict] = None

    @classmethod
    def open(cls, path: str | os.PathLike, allow_pickle: bool = False, span: Optional[Span] = None) -> "Checkpoint":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"no checkpoint folder at '{path}'", span, "paths are relative to the working directory")
        if not path.is_dir():
            raise CheckpointError(f"'{path}' is not a folder", span, "model(...) takes a checkpoint folder")
        config = _read_config(path, span)
        files = _safetensors_files(path, span)
        if files:
            tensors: dict[str, TensorInfo] = {}
            for file in files:
                for name, info in read_header(file).items():
                    if name in tensors:
                        raise CheckpointError(f"{path}: tensor '{name}' is stored in both {tensors[name].file.name} and {file.name}")
                    tensors[name] = info
            _check_index(path, tensors)
            return cls(path, config, tensors, files, pickled=False)
        pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
        if not pickles:
            raise CheckpointError(f"{path}: no safetensors files in the checkpoint folder", span)
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: holds only pickle files ({', '.join(p.name for p in pickles)}), which can run code when loaded",
                span,
                "convert it to safetensors, or pass --allow-pickle if you trust its source",
            )
        return cls._open_pickle(path, config, pickles)

    @classmethod
    def _open_pickle(cls, path: Path, config: dict, files: list[Path]) -> "Checkpoint":
        state, tensors = {}, {}
        for file in files:
            try:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many kinds here
                raise CheckpointError(f"{file}: cannot load pickle checkpoint: {e}") from None
            for name, t in part.items():
                state[name] = t
                tensors[name] = TensorInfo(name, file, t.dtype, tuple(t.shape))
        ckpt = cls(path, config, tensors, files, pickled=True)
        ckpt._state = state
        return ckpt

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        if self._state is not None:
            return self._state[name]
        # Read the tensor's bytes straight into its own buffer: one copy, and no memory map whose
        # touched pages would count against the process while the whole file streams through.
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = open(info.file, "rb", buffering=0)
            handle.seek(info.offset)
            got = handle.readinto(memoryview(buf.numpy())) if info.nbytes else 0
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor '{name}': {e.strerror or e}") from None
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor '{name}' is cut short ({got} of {info.nbytes} bytes; truncated?)")
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"


def _read_config(path: Path, span: Optional[Span]) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json in the checkpoint folder", span)
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON: {e}", span) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object", span)
    return config


def _safetensors_files(path: Path, span: Optional[Span]) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: unreadable index: {e}", span) from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard files that are missing: {', '.join(missing)}", span)
        return sorted((path / n for n in names), key=lambda p: p.name)
    return sorted(path.glob("*.safetensors"), key=lambda p: p.name)


def _check_index(path: Path, tensors: dict[str, TensorInfo]) -> None:
    index = path / INDEX_FILE
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{path / file}: tensor '{name}' is listed in {INDEX_FILE} but not stored")
        if info.file.name != file:
            raise CheckpointError(f"{index}: tensor '{name}' is listed in {file} but stored in {info.file.name}")
