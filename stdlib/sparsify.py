"""Sparsifying one task vector δ = x − base: which of its entries the task-vector operators keep (the keep
rules of task_vectors.py are made of these).

A private helper module: it registers no operator. The math follows mergekit 0.1.5 (``mergekit/sparsify.py``):

* magnitude: keep the ``int(density·numel)`` entries of largest |δ| (TIES);
* random (DARE): keep each entry independently with probability ``density``;
* magnitude outliers (Model Breadcrumbs): sort |δ| ascending, drop the ``n_bot`` smallest and keep
  the next ``int(density·numel)``, where ``n_bot = max(0, numel − int(density·numel) − int(gamma·numel))``,
  so the ``int(gamma·numel)`` largest are dropped as outliers, fewer when density + gamma > 1;
* della magprune: keep each entry with a probability rising linearly with its magnitude rank within its
  row (along dimension 1; a 1-D tensor is one row), from density − epsilon (smallest) to
  density + epsilon (largest);
* ``rescale``: multiply the kept entries by ‖δ‖₁ / ‖kept δ‖₁ (mergekit's L1 rescaling, used by all of its
  task-vector methods; the DARE paper's 1/density is its expectation), unless either norm is below 1e-7.

Random masks are drawn on the CPU from the operator's ``generator`` (one uniform per entry,
``u < p`` keeps the entry: P(keep) = p) and then moved to the tensor's device, so a seed gives the same
masks on every device. mergekit draws ``torch.bernoulli`` from the global torch RNG on the tensor's
device, which cannot be reproduced draw for draw: masks follow the same distribution, not the same draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mgc.core.lazy_torch import torch

from . import slices as sl

_NORM_EPS = 1e-7  # mergekit's tolerance below which an L1 norm is not rescaled


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, *, wide_norms: bool) -> torch.Tensor:
    """δ·mask, times ‖δ‖₁ / ‖δ·mask‖₁ when ``rescale`` (and neither norm is below 1e-7).

    ``wide_norms`` sums the norms in float64 (used by the random methods, whose results cannot match
    mergekit bit for bit anyway: the wider sums make the factor the same float32 on CPU and GPU);
    otherwise in float32 as mergekit does, for bit-identical results with it.
    """
    masked = delta * mask
    if not rescale:
        return masked
    if wide_norms:
        before, after = delta.abs().sum(dtype=torch.float64), masked.abs().sum(dtype=torch.float64)
    else:
        before, after = delta.abs().sum(), masked.abs().sum()
    if before < _NORM_EPS or after < _NORM_EPS:
        return masked
    return masked * (before / after).to(delta.dtype)


# ---------------------------------------------------------------- deterministic


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the max(1, int(density·numel)) entries of largest |δ|, as mergekit 0.1.5 does.

    The k-th largest magnitude is found by selection (O(n), where mergekit sorts everything), and
    entries equal to it are kept by position, lowest index first, so the choice is the same on every
    device. mergekit's unstable sort may keep other entries among those of exactly equal magnitude.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    k = max(1, int(density * n))  # floor, but at least one entry
    return _rescaled(delta, top_k_mask(delta.abs().reshape(-1), k).reshape(delta.shape), rescale, wide_norms=False)


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 mask (in values' dtype) of the k largest of a flat tensor; ties at the k-th value by position."""
    if k >= values.numel():
        return torch.ones_like(values)
    return _cut(values, k).mask(values, 0)


_SAMPLE = 1 << 16


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor (1 <= k <= numel), exactly ``kthvalue(values, n − k + 1)``.

    A full selection over tens of millions of entries is slow (it copies and partially sorts them all).
    Instead, an evenly strided sample brackets the answer between two of its quantiles; one counting pass
    finds how many entries lie above the bracket, and the exact selection runs only on the few inside
    it. Should the bracket miss (a skewed sample), it widens, down to the whole tensor.
    """
    n = values.numel()
    if n <= 4 * _SAMPLE:
        return _kthvalue(values, n - k + 1)
    sample = values[:: n // _SAMPLE].contiguous()
    m = sample.numel()
    q = 1 - k / n  # the answer's quantile
    for margin in (0.01, 0.05, 0.25):
        lo_rank = max(1, int((q - margin) * m))
        hi_rank = min(m, int((q + margin) * m) + 1)
        lo = _kthvalue(sample, lo_rank) if q - margin > 0 else None
        hi = _kthvalue(sample, hi_rank) if q + margin < 1 else None
        above = int(torch.count_nonzero(values > hi)) if hi is not None else 0
        if lo is None:
            inside = values[values <= hi]
        elif hi is None:
            inside = values[values >= lo]
        else:
            inside = values[(values >= lo) & (values <= hi)]
        rank = k - above  # the answer is the rank-th largest inside the bracket
        if 1 <= rank <= inside.numel():
            return _kthvalue(inside, inside.numel() - rank + 1)
    return _kthvalue(values, n - k + 1)


def _kthvalue(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(values.cpu() if values.device.type == "mps" else values, k).values


@dataclass(frozen=True)
class MagnitudeCut:
    """Which entries of one task vector the magnitude trim keeps: |δ| > threshold, and |δ| == threshold
    at flat positions below ``ties_until`` (the first ones by position, as ``top_k_mask``)."""

    threshold: float
    ties_until: int

    def mask(self, magnitudes: torch.Tensor, start: int) -> torch.Tensor:
        """The 0/1 mask (in the magnitudes' dtype) for the slice of |δ| that begins at flat position `start`."""
        keep = magnitudes > self.threshold
        tied = self.ties_until - start
        if tied > 0:
            keep[:tied] |= magnitudes[:tied] == self.threshold
        return keep.to(magnitudes.dtype)


def magnitude_cut(model: torch.Tensor, base: torch.Tensor, density: float) -> Optional[MagnitudeCut]:
    """The cut of ``magnitude`` for δ = model − base (flat, any float dtype; differenced in float32 slice by
    slice), or None when every entry is kept. Found in a few passes over the slices, holding none of |δ| whole:
    the k-th largest |δ| by its float32 bits (non-negative floats order as their bits do), the high 16 bits
    by counting in one pass, the low 16 among the entries sharing those in a second; a third pass finds the
    position of the last tie kept. The same cut as ``_cut`` on the whole |δ|."""
    n = base.numel()
    k = max(1, int(density * n))
    if density >= 1 or k >= n:
        return None
    high = _bit_counts(_magnitudes(model, base), lambda bits: bits >> 16)
    h, above_h = _rank_bin(high, k)
    low = _bit_counts(_magnitudes(model, base), lambda bits: bits[(bits >> 16) == h] & 0xFFFF)
    lo, above_l = _rank_bin(low, k - above_h)
    threshold = float(torch.tensor([(h << 16) | lo], dtype=torch.int32).view(torch.float32))
    missing = k - above_h - above_l  # >= 1: the threshold is the k-th largest
    seen = 0
    for start, mags in _magnitudes(model, base):
        tied = (mags == threshold).nonzero()
        if seen + tied.numel() >= missing:
            return MagnitudeCut(threshold, start + int(tied[missing - seen - 1]) + 1)
        seen += tied.numel()
    raise AssertionError("the k-th largest magnitude was not found again")


def _magnitudes(model: torch.Tensor, base: torch.Tensor):
    """(start, float32 |model − base|) slice by slice, in reused buffers. Widened slice by slice: a float32 −
    bf16 subtraction over a whole tensor takes a slow mixed-dtype path (5× slower than widening both first)."""
    n = base.numel()
    size = min(sl.slice_size(base.device), n)
    wide_model, wide_base = (torch.empty(size, dtype=torch.float32, device=base.device) for _ in "mb")
    for a, b in sl.spans(n, size):
        yield a, wide_model[: b - a].copy_(model[a:b]).sub_(wide_base[: b - a].copy_(base[a:b])).abs_()


def _bit_counts(slices, key) -> torch.Tensor:
    """How many entries have each value 0 … 2¹⁶ − 1 of key(float32 bits as int32), over all slices."""
    counts = None
    for _, mags in slices:
        part = torch.bincount(key(mags.view(torch.int32)).long(), minlength=1 << 16)
        counts = part if counts is None else counts.add_(part)
    return counts.cpu()


def _rank_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(the bin holding the k-th largest entry, how many entries lie in higher bins)."""
    above = counts.flip(0).cumsum(0).flip(0) - counts  # entries in higher bins, per bin
    b = int(((above < k) & (above + counts >= k)).nonzero()[-1])
    return b, int(above[b])


def _cut(magnitudes: torch.Tensor, k: int) -> MagnitudeCut:
    """The cut keeping the k largest of flat magnitudes (k < numel), ties at the k-th by position."""
    threshold = kth_largest(magnitudes, k)
    missing = k - int(torch.count_nonzero(magnitudes > threshold))
    ties_until = int((magnitudes == threshold).nonzero()[missing - 1]) + 1 if missing > 0 else 0
    return MagnitudeCut(float(threshold), ties_until)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Model Breadcrumbs: drop the int(gamma·numel) largest |δ| and keep the next int(density·numel)."""
    if density >= 1:
        return delta
    numel = delta.numel()
    keep_n = int(density * numel)
    top_n = int(gamma * numel)
    bottom_n = max(0, numel - keep_n - top_n)  # fewer outliers dropped when density + gamma > 1
    # The same (unstable) ascending sort as mergekit, so ties in |δ| break the same way on the same device.
    ascending = torch.sort(delta.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(numel, dtype=delta.dtype, device=delta.device)
    mask[ascending[bottom_n:bottom_n + keep_n]] = 1
    return _rescaled(delta, mask.reshape(delta.shape), rescale, wide_norms=False)


# ---------------------------------------------------------------- random


def dare(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (drawn on the CPU from ``generator``)."""
    if density >= 1:
        return delta
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device="cpu")
    keep = (u < density).to(device=delta.device, dtype=delta.dtype)
    return _rescaled(delta, keep, rescale, wide_norms=True)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """P(keep) per entry: density − ε + 2ε·(rank − 1)/(n − 1), rank 1..n by |δ| ascending along dim 1.

    A 0- or 1-D tensor is ranked as one row. Ties in |δ| get distinct ranks by position (a stable
    sort, so the same on every device). A row of one entry gets the midpoint, density.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1]
    if n == 1:
        return torch.full(delta.shape, density, dtype=delta.dtype, device=delta.device)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    positions = torch.arange(n, device=delta.device).reshape(1, n, *[1] * (rows.dim() - 2)).expand_as(order)
    rank0 = torch.empty_like(order).scatter_(1, order, positions)  # 0-based rank of each entry in its row
    # float64: exact ranks however long the row, and the same rounding on every device
    probs = (density - epsilon) + rank0.to(torch.float64) / (n - 1) * (2 * epsilon)
    return probs.to(delta.dtype).reshape(delta.shape)


def della(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with its rank-based probability (drawn on the CPU from ``generator``)."""
    if density >= 1:
        return delta
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(f"density ± epsilon must lie in (0, 1); got density {density}, epsilon {epsilon}")
    probs = della_keep_probabilities(delta, density, epsilon)
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device="cpu")
    keep = (u.to(delta.device) < probs).to(delta.dtype)
    return _rescaled(delta, keep, rescale, wide_norms=True)
