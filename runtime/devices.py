"""Choosing where merge math runs."""
from __future__ import annotations

import torch

from mgc.compiler.errors import MergeRuntimeError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergeRuntimeError("--device cuda was asked for, but torch sees no CUDA device", hint="use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MergeRuntimeError(f"unknown device '{name}'", hint="use auto, cuda or cpu") from None
