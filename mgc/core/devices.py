"""The one choice of device, for merges, `mgc eval`, `mgc diagnose` and `fisher()` alike."""
from __future__ import annotations

from typing import Union

import torch

from mgc.core.errors import MgcError


class DeviceError(MgcError):
    """A device that does not exist, or that torch cannot see."""


def resolve_device(name: Union[str, torch.device, None] = "auto") -> torch.device:
    """"auto" gives cuda when torch sees a GPU, else cpu; anything else is passed to torch.device."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} was asked for, but torch sees no CUDA device", hint="use --device cpu or auto")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device '{name}'", hint="use auto, cuda or cpu") from None
