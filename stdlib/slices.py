"""Slice-by-slice building blocks for operators that take their inputs as stored (``runs="stored"``).

A private helper module: it registers no operator. The inputs may be bf16 or fp16 as read from a
checkpoint; each slice is widened to float32 (or float64) just before use, so no whole widened copy of
an input exists, and the temporaries are small enough to be reused from the allocator's free lists
instead of being freshly mapped (and zeroed by the kernel) for every tensor.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

from mgc.core.lazy_torch import torch

SLICE = 1 << 20  # entries: a float32 slice is 4 MiB, few enough slices that Python's share is small
ACCELERATOR_SLICE = 1 << 22  # on a GPU, fewer and larger kernels: launch overhead dominates small ones
GRAM_BUFFER = 16 << 20  # bytes of gram()'s float64 [N, slice] buffer, whatever the number of tensors


def slice_size(device: torch.device) -> int:
    return SLICE if device.type == "cpu" else ACCELERATOR_SLICE


def spans(numel: int, size: Optional[int] = None) -> Iterator[tuple[int, int]]:
    size = size or SLICE
    for start in range(0, numel, size):
        yield start, min(start + size, numel)


def result(like: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """`out` when the caller gave one, else a new float32 tensor shaped like `like`."""
    return out if out is not None else torch.empty(like.shape, dtype=torch.float32, device=like.device)


def gram(tensors: Sequence[torch.Tensor], size: Optional[int] = None) -> torch.Tensor:
    """G = X·Xᵀ in float64 for the flattened tensors (any float dtype), accumulated slice by slice
    through one reused [N, size] float64 buffer."""
    flat = [t.reshape(-1) for t in tensors]
    n, numel = len(flat), flat[0].numel()
    size = size or min(slice_size(flat[0].device), GRAM_BUFFER // (8 * n))
    g = torch.zeros((n, n), dtype=torch.float64, device=flat[0].device)
    buf = torch.empty((n, min(size, numel)), dtype=torch.float64, device=flat[0].device)
    for a, b in spans(numel, size):
        block = buf[:, : b - a]
        for row, x in zip(block, flat):
            row.copy_(x[a:b])
        for i in range(n):  # the upper triangle by matrix-vector products: far faster than a skinny matmul
            g[i, i:] += block[i:] @ block[i]
    return g.triu() + g.triu(1).T


def linear_combination(
    tensors: Sequence[torch.Tensor], coefficients: Sequence[float], out: Optional[torch.Tensor] = None,
    divisor: Optional[float] = None,
) -> torch.Tensor:
    """Σ kᵢ·xᵢ (then / divisor) in float32, each product rounded before it is added (``k₀x₀ + k₁x₁ + …``,
    as mergekit computes it), slice by slice, into `out` (any float dtype, cast once per slice) or a new
    float32 tensor. The coefficients and divisor are Python floats, used as float32."""
    res = result(tensors[0], out)
    flat, dest = [t.reshape(-1) for t in tensors], res.view(-1)
    k = [float(c) for c in coefficients]
    size = slice_size(dest.device)
    acc, term = (torch.empty(min(size, dest.numel()), dtype=torch.float32, device=dest.device) for _ in "ab")
    for a, b in spans(dest.numel(), size):
        part = acc[: b - a].copy_(flat[0][a:b]).mul_(k[0])
        for ki, x in zip(k[1:], flat[1:]):
            part.add_(term[: b - a].copy_(x[a:b]).mul_(ki))
        if divisor is not None:
            part.div_(divisor)
        dest[a:b].copy_(part)
    return res
