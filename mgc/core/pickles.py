"""Pickle checkpoint files (`.bin`, `.pt`, `.pth`), read only when the caller allows them: torch's weights_only
loader unpickles plain tensors and containers, never code."""
from __future__ import annotations

from pathlib import Path

from mgc.core.lazy_torch import torch

from mgc.core.errors import CheckpointError
from mgc.core.paths import regular_file_size
from mgc.core.safetensors_header import DTYPE_CODES, DTYPES

_ZIP_MAGIC = b"PK\x03\x04"


def load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint file's state dict (weights_only: plain tensors and containers, no code)."""
    regular_file_size(file)
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
