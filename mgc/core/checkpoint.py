"""Hugging Face checkpoint folders: config, tensor index from safetensors headers, lazy reads.

Opening a checkpoint reads only config.json and each shard's header (parsed and validated in
safetensors_header.py); tensor data is read on demand, one tensor at a time, straight into its own buffer.
Pickle (`.bin`) checkpoints are refused unless the caller allows them (pickles.py).
"""
from __future__ import annotations

import math
import os
import stat
import threading
from pathlib import Path
from typing import Optional

from mgc.core.lazy_torch import torch

from mgc.core.errors import CheckpointError, Span
from mgc.core.paths import regular_file_size, show_path, stat_path
from mgc.core.pickles import load_pickle
from mgc.core.safetensors_header import TensorInfo, read_header
from mgc.core.strict_json import json_type, loads

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class Checkpoint:
    """A checkpoint folder: config.json plus safetensors shards (or, if allowed, pickle files)."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, TensorInfo], files: list[Path], pickled: bool):
        self.path = path
        self.config = config
        self.tensors = tensors
        self.files = files
        self.pickled = pickled
        self._handles: dict[Path, object] = {}
        self._seek_lock = threading.Lock()
        self._state: Optional[dict] = None

    @classmethod
    def open(cls, path: str | os.PathLike, allow_pickle: bool = False, span: Optional[Span] = None) -> "Checkpoint":
        path = Path(path)
        st = stat_path(path, span)
        if st is None:
            raise CheckpointError(f"no checkpoint folder at '{show_path(path)}'", span, "paths are relative to the working directory")
        if not stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"'{show_path(path)}' is not a folder", span, "model(...) takes a checkpoint folder")
        try:
            return cls._open_folder(path, allow_pickle, span)
        except OSError as e:  # a file that vanished or cannot be listed mid-way; read errors are handled closer
            raise CheckpointError(f"{show_path(e.filename or path)}: cannot read: {e.strerror or e}", span) from None

    @classmethod
    def _open_folder(cls, path: Path, allow_pickle: bool, span: Optional[Span]) -> "Checkpoint":
        config = _read_config(path, span)
        weight_map = _read_index(path, span)
        files = _safetensors_files(path, weight_map, span)
        if files:
            tensors: dict[str, TensorInfo] = {}
            for file in files:
                for info in read_header(file).values():
                    _add_tensor(path, tensors, info)
            if weight_map is not None:
                _check_index(path, tensors, weight_map)
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
            for name, t in load_pickle(file).items():
                _add_tensor(path, tensors, TensorInfo(name, file, t.dtype, tuple(t.shape)))
                state[name] = t
        ckpt = cls(path, config, tensors, files, pickled=True)
        ckpt._state = state
        return ckpt

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        if self._state is not None:
            return self._state[name]
        return self.read_flat(name, 0, math.prod(info.shape)).reshape(info.shape)

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) of the flattened tensor `name` (of a safetensors checkpoint), read from its file
        straight into their own buffer: one copy, and no memory map whose touched pages would count against the
        process while the whole file streams through."""
        info = self.tensors[name]
        size = info.dtype.itemsize
        nbytes = (stop - start) * size
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            handle, begin = self._handle(info.file), info.offset + start * size
            view, got = memoryview(buf.numpy()), 0
            while got < nbytes:  # one read(2) returns at most ~2 GiB on Linux: a big tensor takes several
                step = self._read_at(handle, view[got:], begin + got)
                if not step:
                    break
                got += step
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor '{name}': {e.strerror or e}") from None
        if got != nbytes:
            raise CheckpointError(f"{info.file}: tensor '{name}' is cut short ({got} of {nbytes} bytes; truncated?)")
        return buf.view(info.dtype.torch)

    def will_read(self, name: str, start: int, stop: int) -> None:
        """Ask the kernel to start reading entries [start, stop) of `name` into the page cache, without waiting."""
        info = self.tensors[name]
        size = info.dtype.itemsize
        stop = min(stop, math.prod(info.shape))
        if stop > start and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._handle(info.file).fileno(), info.offset + start * size, (stop - start) * size,
                                 os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # only advice: the read itself reports what is wrong

    def _read_at(self, handle, view: memoryview, offset: int) -> int:
        """One positioned read: the read-ahead thread and a streamed merge read the same files at once."""
        if hasattr(os, "preadv"):
            return os.preadv(handle.fileno(), [view], offset)
        with self._seek_lock:  # no positioned reads (Windows): one seek and read at a time
            handle.seek(offset)
            return handle.readinto(view)

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = open(file, "rb", buffering=0)
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"


def _add_tensor(path: Path, tensors: dict[str, TensorInfo], info: TensorInfo) -> None:
    if info.name in tensors:
        raise CheckpointError(
            f"{path}: tensor '{info.name}' is stored in both {tensors[info.name].file.name} and {info.file.name}"
        )
    tensors[info.name] = info


def _read_json(file: Path, what: str, span: Optional[Span], *, strict: bool) -> object:
    try:
        regular_file_size(file)
        raw = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e.strerror or e}", span) from None
    except CheckpointError as err:
        err.span = err.span or span
        raise
    return loads(raw, str(file), what, span, strict=strict)


def _read_config(path: Path, span: Optional[Span]) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json in the checkpoint folder", span)
    # Not strict: transformers reads config.json with Python's json, duplicate keys and NaN included.
    config = _read_json(file, "config.json", span, strict=False)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object but {json_type(config)}", span)
    return config


def _plain_file_name(name: str) -> bool:
    """A file directly in the checkpoint folder: no folder part, no '..', not absolute."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _read_index(path: Path, span: Optional[Span]) -> Optional[dict[str, str]]:
    """The index's weight_map (tensor name -> shard file name), checked; None without an index."""
    index = path / INDEX_FILE
    if not index.is_file():
        return None
    data = _read_json(index, INDEX_FILE, span, strict=True)
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(
            f"{index}: not a safetensors index (no \"weight_map\" object)", span,
            "an index maps each tensor name to its shard file under \"weight_map\"",
        )
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: \"weight_map\" is {json_type(weight_map)}, not an object of tensor name -> shard file", span
        )
    if not weight_map:
        raise CheckpointError(f"{index}: \"weight_map\" lists no tensors", span)
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: tensor '{name}' maps to {json_type(shard)}, not a shard file name", span)
        if not _plain_file_name(shard):
            raise CheckpointError(
                f"{index}: tensor '{name}' is listed in '{show_path(shard)}', which is not a file of the checkpoint folder",
                span, "shard names in an index are plain file names beside it (no folders, no '..')",
            )
        if not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index}: tensor '{name}' is listed in '{shard}', which is not a .safetensors file", span)
    return weight_map


def _safetensors_files(path: Path, weight_map: Optional[dict[str, str]], span: Optional[Span]) -> list[Path]:
    if weight_map is not None:
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX_FILE}: names shard files that are missing: {', '.join(missing)}", span)
        return sorted((path / n for n in names), key=lambda p: p.name)
    return sorted(path.glob("*.safetensors"), key=lambda p: p.name)


def _check_index(path: Path, tensors: dict[str, TensorInfo], weight_map: dict[str, str]) -> None:
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{path / file}: tensor '{name}' is listed in {INDEX_FILE} but not stored")
        if info.file.name != file:
            raise CheckpointError(f"{path / INDEX_FILE}: tensor '{name}' is listed in {file} but stored in {info.file.name}")
