"""The Fisher cache's keys, known from a checkpoint's files and a data file without computing anything, so
`mgc check` and `mgc plan` do no tensor work; mgc.fisher computes what is missing before a run (see its docstring).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from mgc.core.checkpoint import TOKENIZER_FILES
from mgc.core.safetensors_header import read_header
from mgc.core.documents import decode_text, split_documents
from mgc.core.errors import CheckpointError, MgcError
from mgc.core.paths import cache_root

from .ir import Load

# 2: documents split and tokenized as `mgc eval` does (mgc.lm): a file without a blank line is one document,
# and BOS is prepended where a tokenizer has one it does not add itself (GPT-2, Pythia): every earlier cache
# entry may hold another Fisher, so none is reused
ESTIMATOR_VERSION = 2
DEFAULT_SAMPLES = 64
DEFAULT_MAX_LENGTH = 256
INFO_FILE = "fisher.json"
WEIGHTS_FILE = "model.safetensors"
_SAMPLE_BYTES = 64  # bytes hashed at the start, middle and end of each stored tensor
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")

PathLike = Union[str, os.PathLike]


class FisherError(MgcError):
    """A Fisher cannot be estimated: bad data, a missing package, an architecture whose names do not map."""


# --- data --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataInfo:
    sha256: str
    documents: int


def inspect_data(path: PathLike) -> DataInfo:
    """The data file's sha256 and document count (no tokenizer needed). Raises FisherError if unusable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FisherError(f"cannot read data file '{path}': {e.strerror or e}") from None
    try:
        text = decode_text(raw)
    except UnicodeDecodeError as e:
        raise FisherError(f"data file '{path}' is not UTF-8 text (byte {e.start})") from None
    docs = split_documents(text)
    if not docs:
        raise FisherError(f"data file '{path}' holds no text", hint="give a text file: documents separated by blank lines")
    return DataInfo(hashlib.sha256(raw).hexdigest(), len(docs))


# --- cache key -----------------------------------------------------------------------------------------


def cache_path(key: str) -> Path:
    return cache_root() / "fisher" / key


def is_cached(path: PathLike) -> bool:
    """A cache folder is complete when it exists at all (it is renamed into place only once written);
    the files are checked anyway, in case someone deleted one by hand."""
    path = Path(path)
    return all((path / n).is_file() for n in ("config.json", WEIGHTS_FILE, INFO_FILE))


def _weight_files(model_dir: Path) -> list[Path]:
    files = {f for pattern in _WEIGHT_PATTERNS for f in model_dir.glob(pattern) if f.is_file()}
    return sorted(files, key=lambda p: p.name)


def _fingerprint_weights(h, file: Path) -> None:
    """Name, size and mtime of a weight file, plus (safetensors) its header bytes and a few bytes from the start,
    middle and end of every tensor. The header alone is not enough: two fine-tunes of one architecture have
    byte-identical headers; the sampled bytes tell them apart even when mtimes collide (copies, checkouts)."""

    st = file.stat()
    _part(h, "file", f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(file, "rb") as f:
        windows: list[tuple[int, int]] = []
        if file.suffix == ".safetensors" and st.st_size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            header = f.read(min(n, st.st_size - 8))
            _part(h, "header", header)
            try:
                infos = read_header(file)
            except CheckpointError:  # a file mgc would refuse to read: its header bytes are enough
                infos = {}
            base = 8 + n
            for name, info in sorted(infos.items()):
                begin = info.offset - base
                end = begin + info.nbytes
                mid = (begin + end) // 2
                for start in (begin, mid - _SAMPLE_BYTES // 2, end - _SAMPLE_BYTES):
                    start = max(begin, start)
                    windows.append((base + start, min(_SAMPLE_BYTES, end - start)))
        else:
            step = max(1, st.st_size // 16)
            windows = [(i * step, 4096) for i in range(16)]
        for offset, size in windows:
            f.seek(offset)
            h.update(f.read(max(0, size)))


def _part(h, tag: str, data: bytes) -> None:
    h.update(tag.encode() + b"\0" + len(data).to_bytes(8, "little"))
    h.update(data)


def fingerprint_checkpoint(h, model_dir: Path) -> None:
    """Hash into `h` the checkpoint's config.json bytes, its tokenizer files' bytes and its weight fingerprints."""
    _part(h, "config", (model_dir / "config.json").read_bytes())
    for name in sorted(TOKENIZER_FILES):
        if (model_dir / name).is_file():
            _part(h, f"tokenizer:{name}", (model_dir / name).read_bytes())
    for file in _weight_files(model_dir):
        _fingerprint_weights(h, file)


def fisher_key(
    model_dir: PathLike, data_path: PathLike, samples: int = DEFAULT_SAMPLES, max_length: int = DEFAULT_MAX_LENGTH,
    *, data_sha256: Optional[str] = None,
) -> str:
    """sha256 over: the estimator version; the model's config.json bytes; its tokenizer files' bytes (they decide
    the tokens); each weight file's name, size, mtime, safetensors header bytes and sampled tensor bytes; the
    data file's sha256 (its content, not its path); `samples` and `max_length`. Reads headers and a few bytes per
    tensor, never whole tensors, and the data file unless its sha256 is given."""

    h = hashlib.sha256()
    _part(h, "mgc-fisher", str(ESTIMATOR_VERSION).encode())
    fingerprint_checkpoint(h, Path(model_dir))
    _part(h, "data", (data_sha256 or inspect_data(data_path).sha256).encode())
    _part(h, "samples", str(int(samples)).encode())
    _part(h, "max_length", str(int(max_length)).encode())
    return h.hexdigest()


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


# --- before a run ------------------------------------------------------------------------------------------


def fishers_used(plan) -> list:
    """The FisherModels whose tensors the plan's graph loads, one per cache folder."""

    fishers = getattr(plan.program, "fishers", {})
    loaded = {plan.graph.payload(n).checkpoint for n in plan.graph.of_kind(Load)}
    return [fm for path, fm in fishers.items() if path in loaded]


def plan_lines(plan) -> list[str]:
    """Lines for a plan summary: each Fisher the run needs, cached or to compute."""
    lines = []
    for fm in fishers_used(plan):
        state = "cached" if is_cached(fm.cache_path) else "to compute"
        lines.append(
            f"  fisher({fm.model.checkpoint.path.name}, data = {fm.data.name}, samples = {fm.samples}, "
            f"max_length = {fm.max_length}): {state}  [{fm.cache_path}]"
        )
    return (["", "fisher:"] + lines) if lines else []
