"""PEFT adapter folders: adapter_config.json and adapter_model.safetensors (adapter_model.bin only where pickles
are allowed), read and validated as strictly as a checkpoint's files. Only the reading lives here; what the
config means is compiler/lora.py's."""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Optional

from mgc.core.checkpoint import Checkpoint, _read_json
from mgc.core.errors import CheckpointError, Span
from mgc.core.paths import show_path, stat_path
from mgc.core.pickles import load_pickle
from mgc.core.safetensors_header import TensorInfo, read_header
from mgc.core.strict_json import json_type

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FORMAT_HINT = "an adapter folder holds adapter_config.json and adapter_model.safetensors, as peft's save_pretrained writes them"


class Adapter(Checkpoint):
    """An adapter's tensors, read one at a time like a checkpoint's. Its `path`, the key its tensors are loaded
    under, is its weights file, so it never shares a key with a checkpoint folder; `folder` is the adapter folder."""

    what = "the input LoRA adapter"

    def __init__(self, folder: Path, config: dict, tensors: dict[str, TensorInfo], weights: Path, pickled: bool):
        super().__init__(weights, config, tensors, [weights, folder / CONFIG_FILE], pickled)
        self.folder = folder

    def __repr__(self) -> str:
        return f"Adapter({str(self.folder)!r}, {len(self.tensors)} tensors)"


def is_adapter_folder(path: Path) -> bool:
    """A folder with adapter_config.json and no weights of a full checkpoint beside it."""
    try:
        if not (path / CONFIG_FILE).is_file():
            return False
        return not any(
            p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("adapter_model") for p in path.iterdir()
        )
    except (OSError, ValueError):
        return False


def refuse_as_checkpoint(path: Path, text: str, span: Optional[Span]) -> None:
    """`model("folder")` on an adapter folder: the error points at lora()."""
    if is_adapter_folder(path):
        raise CheckpointError(
            f"'{show_path(text)}' is a LoRA adapter (it holds {CONFIG_FILE}), not a full checkpoint", span,
            f'use lora("{text}"): it adds the adapter to its base model',
        )


def open_adapter(folder: Path, allow_pickle: bool, span: Optional[Span] = None) -> Adapter:
    st = stat_path(folder, span)
    if st is None:
        raise CheckpointError(f"no LoRA adapter folder at '{show_path(folder)}'", span, FORMAT_HINT)
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"'{show_path(folder)}' is not a folder", span, f"lora() takes an adapter folder: {FORMAT_HINT}")
    try:
        return _open(folder, allow_pickle, span)
    except CheckpointError as err:
        err.span = err.span or span
        raise
    except OSError as e:
        raise CheckpointError(f"{show_path(e.filename or folder)}: cannot read: {e.strerror or e}", span) from None


def _open(folder: Path, allow_pickle: bool, span: Optional[Span]) -> Adapter:
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        full = (folder / "config.json").is_file()
        raise CheckpointError(
            f"{folder}: no {CONFIG_FILE} in the adapter folder", span,
            "it holds config.json: a full checkpoint is read with model(...)" if full else FORMAT_HINT,
        )
    # not strict, as peft reads it with Python's json
    config = _read_json(config_file, CONFIG_FILE, span, strict=False)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object but {json_type(config)}", span)
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        tensors = read_header(weights)
        pickled, state = False, None
    else:
        weights = folder / PICKLE_FILE
        if not weights.is_file():
            raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} in the adapter folder", span, FORMAT_HINT)
        if not allow_pickle:
            raise CheckpointError(
                f"{folder}: holds only a pickle file ({PICKLE_FILE}), which can run code when loaded", span,
                "convert it to safetensors, or pass --allow-pickle if you trust its source",
            )
        state = load_pickle(weights)
        tensors = {n: TensorInfo(n, weights, t.dtype, tuple(t.shape)) for n, t in state.items()}
        pickled = True
    if not tensors:
        raise CheckpointError(f"{weights}: holds no tensors", span)
    adapter = Adapter(folder, config, tensors, weights, pickled)
    adapter._state = state
    return adapter
