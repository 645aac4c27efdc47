"""The names of floating dtypes, as config.json's torch_dtype spells them: one table for messages and configs."""
from __future__ import annotations

import torch

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))
