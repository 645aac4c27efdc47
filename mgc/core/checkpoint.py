"""Hugging Face checkpoint folders: config, tensor index from safetensors headers, lazy reads.

Opening a checkpoint reads only config.json and each shard's header (parsed and validated
here); tensor data is read on demand, one tensor at a time, straight into its own buffer.
Pickle (`.bin`) checkpoints are refused unless the caller allows them.
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mgc.core.errors import CheckpointError, Span

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


# Sizes, offsets and element counts must fit torch's int64 sizes (safetensors itself allows up to 2**64 - 1).
MAX_COUNT = 2**63 - 1


class _JsonRejected(ValueError):
    """Raised from inside json.loads by the strict hooks below."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _JsonRejected(f"the key {key!r} appears twice in one object")
        obj[key] = value
    return obj


def _no_constant(name: str):
    raise _JsonRejected(f"{name} is not a JSON value")


def _loads(raw: bytes, where: str, what: str, span: Optional[Span] = None, *, strict: bool = True,
           must_start: str = "") -> object:
    """JSON from UTF-8 bytes, or a CheckpointError `where: what ...`. `strict` refuses what Python's json
    would otherwise accept: duplicate keys (the last would silently win) and NaN/Infinity."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: {what} is not UTF-8 text (invalid byte at offset {e.start})", span) from None
    if must_start and not text.startswith(must_start):
        raise CheckpointError(f"{where}: {what} does not start with '{must_start}' ({text[:16]!r})", span)
    hooks = {"object_pairs_hook": _unique_keys, "parse_constant": _no_constant} if strict else {}
    try:
        return json.loads(text, **hooks)
    except RecursionError:
        raise CheckpointError(f"{where}: {what} is nested too deeply to parse (deeper than any real one)", span) from None
    except _JsonRejected as e:
        raise CheckpointError(f"{where}: {what} is not valid: {e}", span) from None
    except ValueError as e:  # JSONDecodeError, and integers longer than Python's digit limit
        raise CheckpointError(f"{where}: {what} is not valid JSON: {e}", span) from None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _is_count(value: object) -> bool:
    """A non-negative JSON integer that fits int64 (not a bool, a float or a string)."""
    return type(value) is int and 0 <= value <= MAX_COUNT


def _regular_file_size(file: Path) -> int:
    """The size of `file`, which must be a regular file: a FIFO or a device would block or never end."""
    try:
        st = os.stat(file)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{file}: not a regular file")
    return st.st_size


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header without reading its data."""
    size = _regular_file_size(file)
    try:
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
    if len(raw) != n:
        raise CheckpointError(f"{file}: truncated safetensors header (the file shrank while it was read)")
    if n == 0:
        raise CheckpointError(f"{file}: corrupt safetensors header (its size is 0)")
    header = _loads(raw, str(file), "the safetensors header", must_start="{")
    return validate_header(header, file, 8 + n, size - 8 - n)


def validate_header(header: object, file: Path, data_start: int, data_size: int) -> dict[str, TensorInfo]:
    """The tensors of a parsed safetensors header, checked as strictly as the safetensors library checks them.

    Every entry but `__metadata__` (an object of strings) is {"dtype", "shape", "data_offsets"}, with a
    known dtype, a list of non-negative integers for a shape, and [begin, end] integer offsets whose span
    holds exactly the shape's bytes; sorted by offset, the tensors tile the data region from 0 to its end,
    with no overlap, no gap and nothing after the last one. `data_start` is where the data region starts
    in the file, `data_size` its length.
    """
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object but {_json_type(header)})")
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
            raise CheckpointError(f"{where} has a header entry that is {_json_type(entry)}, not an object")
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
        nbytes = numel * _itemsize(dtype)
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
                for name, info in read_header(file).items():
                    if name in tensors:
                        raise CheckpointError(f"{path}: tensor '{name}' is stored in both {tensors[name].file.name} and {file.name}")
                    tensors[name] = info
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
            for name, t in _load_pickle(file).items():
                if name in tensors:
                    raise CheckpointError(f"{path}: tensor '{name}' is stored in both {tensors[name].file.name} and {file.name}")
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
            view, got = memoryview(buf.numpy()), 0
            while got < info.nbytes:  # one read(2) returns at most ~2 GiB on Linux: a big tensor takes several
                step = handle.readinto(view[got:])
                if not step:
                    break
                got += step
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


def show_path(path: str | os.PathLike, limit: int = 200) -> str:
    """A path for a message: NUL bytes made visible, an over-long one shortened in the middle."""
    text = os.fsdecode(path).replace("\0", "\\0")
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def stat_path(path: Path, span: Optional[Span]) -> Optional[os.stat_result]:
    """os.stat(path), following links; None where nothing is there. A path that cannot name a file (a NUL
    byte, a name too long, a symlink loop) or cannot be looked at is a CheckpointError naming it."""
    if "\0" in os.fsdecode(path):
        raise CheckpointError(f"the checkpoint path '{show_path(path)}' contains a NUL byte", span)
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(
                f"the checkpoint path '{show_path(path)}' is a symlink loop", span,
                "a symbolic link on this path points, directly or through others, back at itself",
            ) from None
        if e.errno == errno.ENAMETOOLONG:
            raise CheckpointError(f"the checkpoint path '{show_path(path)}' is too long for the file system", span) from None
        raise CheckpointError(f"cannot access the checkpoint path '{show_path(path)}': {e.strerror or e}", span) from None
    except ValueError as e:  # a path the OS cannot represent
        raise CheckpointError(f"the checkpoint path '{show_path(path)}' is not a valid path: {e}", span) from None


def resolve_checkpoint_path(text: str, base_dir: str | os.PathLike, span: Optional[Span] = None) -> Path:
    """The absolute, symlink-free path that `model("text")` names: `text`, with ~ expanded, relative to
    `base_dir`. Raises only CheckpointError, located at `span`: for a NUL byte, a name too long for the file
    system, a symlink loop, or a path that cannot be looked at (no permission). A path where nothing is is
    returned all the same (resolved as far as it exists), for the caller to fetch or report."""
    if "\0" in text:
        raise CheckpointError(f"the checkpoint path '{show_path(text)}' contains a NUL byte", span)
    path = Path(base_dir) / os.path.expanduser(text)
    stat_path(path, span)
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: Python < 3.13's "Symlink loop"
        raise CheckpointError(f"cannot resolve the checkpoint path '{show_path(path)}': {e}", span) from None


def _read_json(file: Path, what: str, span: Optional[Span], *, strict: bool) -> object:
    try:
        _regular_file_size(file)
        raw = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e.strerror or e}", span) from None
    except CheckpointError as err:
        err.span = err.span or span
        raise
    return _loads(raw, str(file), what, span, strict=strict)


def _read_config(path: Path, span: Optional[Span]) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json in the checkpoint folder", span)
    # Not strict: transformers reads config.json with Python's json, duplicate keys and NaN included.
    config = _read_json(file, "config.json", span, strict=False)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object but {_json_type(config)}", span)
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
            f"{index}: \"weight_map\" is {_json_type(weight_map)}, not an object of tensor name -> shard file", span
        )
    if not weight_map:
        raise CheckpointError(f"{index}: \"weight_map\" lists no tensors", span)
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: tensor '{name}' maps to {_json_type(shard)}, not a shard file name", span)
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


_ZIP_MAGIC = b"PK\x03\x04"


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint file's state dict (weights_only: plain tensors and containers, no code)."""
    _regular_file_size(file)
    try:
        with open(file, "rb") as f:
            zipped = f.read(4) == _ZIP_MAGIC
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
    try:
        # torch can map only its zip format (the default since torch 1.6); a legacy file is read whole.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # torch raises many kinds here
        text = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise CheckpointError(f"{file}: cannot load pickle checkpoint: {text}") from None
    hint = "mgc reads a state dict: a file written by torch.save(model.state_dict(), ...)"
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds an object of type {type(state).__name__}, not a dict of tensors", hint=hint)
    for name, t in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{file}: has a key {name!r:.80} that is not a tensor name", hint=hint)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{file}: '{name}' holds an object of type {type(t).__name__}, not a tensor", hint=hint)
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            raise CheckpointError(f"{file}: tensor '{name}' is not a plain dense tensor ({t.layout}, {t.device})")
        if t.dtype not in DTYPE_CODES:
            raise CheckpointError(f"{file}: tensor '{name}' has the unsupported dtype {t.dtype}", hint=f"mgc reads {', '.join(DTYPES)}")
    return state
