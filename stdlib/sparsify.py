"""Shared pieces of the task-vector operators: sparsifying one task vector δ = x − base, and
combining the sparsified task vectors (a weighted sum, or TIES' sign election and disjoint mean).

A private helper module: it registers no operator. The math follows mergekit 0.1.5
(``mergekit/sparsify.py`` and ``merge_methods/generalized_task_arithmetic.py``):

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

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Annotated, Iterable, Optional, Sequence

import torch
from pydantic import Field

from . import slices as sl

_NORM_EPS = 1e-7  # mergekit's tolerance below which an L1 norm is not rescaled


class TaskVectors(SequenceABC):
    """The task vectors δᵢ = xᵢ − base of the models, each computed when it is read.

    What an operator's ``merge`` hands its ``merge_deltas``: one that takes the task vectors one at a
    time (a weighted sum) then holds one at a time, and every δᵢ is the same float32 difference.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor):
        self._tensors, self._base = tensors, base

    def __len__(self) -> int:
        return len(self._tensors)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._tensors[i] - self._base


def per_model(values: Optional[Sequence[float]], n: int, default: float, name: str, op: str) -> list[float]:
    """The list of one value per model, the default for each when the recipe gives none."""
    if values is None:
        return [default] * n
    if len(values) != n:
        raise ValueError(f"{op}: '{name}' has {len(values)} values for {n} models")
    return list(values)


def per_model_values(params, n: int, op: str, **defaults: float) -> list[list[float]]:
    """For each name given with its default, that per-model parameter of ``params`` as one value per model."""
    return [per_model(getattr(params, name), n, default, name, op) for name, default in defaults.items()]


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


def magnitude_cut(model: torch.Tensor, base: torch.Tensor, density: float, work: torch.Tensor) -> Optional[MagnitudeCut]:
    """The cut of ``magnitude`` for δ = model − base (flat, any float dtype; differenced in float32 in the
    float32 buffer `work`), or None when every entry is kept."""
    n = work.numel()
    k = max(1, int(density * n))
    if density >= 1 or k >= n:
        return None
    # Widened slice by slice: a float32 − bf16 subtraction over the whole tensor takes a slow mixed-dtype
    # path (5× slower than widening both sides first).
    size = sl.slice_size(work.device)
    wide_base = torch.empty(min(size, n), dtype=torch.float32, device=work.device)
    for a, b in sl.spans(n, size):
        work[a:b].copy_(model[a:b]).sub_(wide_base[: b - a].copy_(base[a:b])).abs_()
    return _cut(work, k)


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


# ---------------------------------------------------------------- combining


def weighted_sum(deltas: Iterable[torch.Tensor], weights: Sequence[float], normalize: bool, lambda_: float) -> torch.Tensor:
    """λ·Σ wᵢδᵢ, divided by Σ wᵢ when ``normalize`` (by 1 when |Σ wᵢ| < 1e-8, as mergekit).

    Accumulated model by model in float32, bit-identical to mergekit's sum over its stacked deltas.
    ``deltas`` may be a generator, so only one task vector is held at a time.
    """
    total: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None
    for i, d in enumerate(deltas):
        if total is None:
            w = torch.tensor(list(weights), dtype=d.dtype, device=d.device)
            total = torch.zeros_like(d)
        total += d * w[i]
    if normalize:
        divisor = w.sum()
        total /= torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    if lambda_ != 1:
        total.mul_(lambda_)
    return total


def sign_agreement(stacked: torch.Tensor) -> torch.Tensor:
    """TIES' sign election ("sum" consensus) over dim 0: 1.0 where an entry's sign equals the sign of the
    sum over models (a zero sum elects +), else 0.0. Zero entries never agree."""
    elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    return (stacked.sign() == elected).to(stacked.dtype)


def disjoint_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool, lambda_: float) -> torch.Tensor:
    """TIES' combination: λ·Σ wᵢδᵢ[agree] / Σ wᵢ[agree] (the disjoint mean; the plain agreeing sum without
    ``normalize``), the signs elected on the weighted task vectors; a zero divisor divides by 1.
    A list of deltas is emptied, so that their memory is freed as soon as they are stacked."""
    stacked = torch.stack(list(deltas))
    if isinstance(deltas, list):
        deltas.clear()  # the caller's copies are in `stacked` now
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *[1] * (stacked.dim() - 1))
    # In place where the values are not needed again: the same arithmetic, a third of the memory.
    weighted = stacked.mul_(w)
    agree = sign_agreement(weighted)
    mixed = weighted.mul_(agree).sum(dim=0)
    del weighted, stacked
    if normalize:
        divisor = agree.mul_(w).sum(dim=0)
        mixed /= torch.where(divisor == 0, 1.0, divisor)
    if lambda_ != 1:
        mixed *= lambda_
    return mixed


# ---------------------------------------------------------------- parameter schema pieces

Density = Annotated[float, Field(gt=0.0, le=1.0)]
Gamma = Annotated[float, Field(ge=0.0, le=1.0)]
Epsilon = Annotated[float, Field(ge=0.0, lt=1.0)]
DELLA_EPSILON = 0.15  # mergekit's default epsilon


def weights_field():
    return Field(
        None, description="one weight per model, multiplying its sparsified task vector",
        json_schema_extra={"default_text": "1.0 each"},
    )


def density_field(what: str):
    return Field(None, description=f"fraction of each task vector's entries kept{what}", json_schema_extra={"default_text": "1.0 each"})


def normalize_field(default: bool, what: str = "the weights"):
    return Field(default, description=f"divide the merged task vector by the sum of {what}")


def rescale_field(default: bool):
    return Field(default, description="scale each sparsified task vector back to its original L1 norm")


def lambda_field():
    return Field(1.0, alias="lambda", description="scale of the merged task vector")


def seed_field():
    return Field(0, ge=0, description="seed of the random masks (combined with each tensor's name)")


def check_della(density: Optional[Sequence[float]], epsilon: Optional[Sequence[float]]) -> None:
    """density ± epsilon must lie in (0, 1) for every model whose density is below 1."""
    densities = list(density) if density is not None else None
    epsilons = list(epsilon) if epsilon is not None else None
    if densities is None:
        return  # density 1 everywhere: nothing is pruned and epsilon is unused
    if epsilons is None:
        epsilons = [DELLA_EPSILON] * len(densities)
    elif len(epsilons) != len(densities):
        return  # lengths are checked against the models when merging
    for d, e in zip(densities, epsilons):
        if d < 1 and not (d - e > 0 and d + e < 1):
            raise ValueError(
                f"density ± epsilon must lie in (0, 1) wherever density < 1; got density {d:g}, epsilon {e:g}"
            )

