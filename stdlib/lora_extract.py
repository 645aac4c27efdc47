"""A LoRA adapter's factors extracted from one tensor: the best rank-r approximation of Δ = tuned − base.

Internal: ``extract_lora(tuned, base = b)`` lowers each tensor of the adapter it writes to this operation (inputs:
the base tensor, then the tuned one); a recipe cannot call it by name.

``mode = "factors"``: Δ (Δᵀ with ``transpose``, for GPT-2's Conv1D stored [in, out]) is [out, in]; its truncated
SVD U·S·Vᵀ at rank r is split evenly, B = U·√S (out × r) and A = √S·Vᵀ (r × in), so that B·A is the best rank-r
approximation of Δ in Frobenius norm (Eckart–Young: ‖Δ − B·A‖² is the sum of the discarded σ²). The result packs
them in one float32 tensor of shape (r + 1, in + out): rows 0 … r−1 are [A | Bᵀ], and the last row starts with
‖Δ‖² and the kept Σσ² (the rest zeros). r is ``rank``, or with ``energy`` the smallest rank whose σ² hold that
fraction of ‖Δ‖² (``rank`` then caps it; r is 0 when Δ is 0). Each column of U has its largest entry positive,
so the factors do not depend on the SVD routine's choice of signs.

``mode = "whole"``: the tuned tensor flattened, and one more entry: 1 where it differs from the base, 0 where it
equals it bit for bit (peft needs every tensor of a module it saves whole, so the writer decides what to keep).

``svd``: "full" is torch.linalg.svd; "randomized" is torch.svd_lowrank (Halko, Martinsson & Tropp 2011,
arXiv:0909.4061) with rank + ``oversample`` columns (by default twice the rank) and ``power_iters`` power
iterations, its random draws seeded from ``ctx.generator`` (seeded from the tensor's name, so two runs on the same
number of threads write the same bytes); "auto" takes the randomized one where ``auto_randomized`` says it is
as accurate as the full one.
Measured on deltas with a slowly decaying spectrum (bench/extract_lora.py, docs/performance.md), 2r columns and
4 power iterations keep at least 99.99 % of the energy the full SVD keeps at rank r, 3 to 25 times faster while
2r is at most a quarter of the smaller side; beyond that the full SVD is as fast.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field, field_validator, model_validator

from .operator import MergeContext, Operator, OpParams

# "auto" runs the randomized SVD when rank + oversample is at most min(out, in) / RANDOMIZED_BELOW (measured: above
# that, torch.svd_lowrank with 4 power iterations is no faster than torch.linalg.svd)
RANDOMIZED_BELOW = 4


class Params(OpParams):
    mode: Literal["factors", "whole"] = Field("factors", description="low-rank factors of Δ, or the whole tuned tensor")
    rank: Optional[int] = Field(None, ge=1, description="the rank kept; with energy, the largest rank kept")
    energy: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False,
                                    description="keep the smallest rank whose singular values hold this fraction of ‖Δ‖²")
    svd: Literal["auto", "full", "randomized"] = Field(
        "auto", description="full SVD, randomized SVD, or auto: by rank and size")
    oversample: Optional[int] = Field(
        None, ge=0, description="extra columns of the randomized SVD's range finder (default: as many as the rank)")
    power_iters: int = Field(4, ge=0, description="power iterations of the randomized SVD")
    transpose: bool = Field(False, description="the tensor is stored [in, out] (GPT-2's Conv1D)")
    seed: int = Field(0, description="with the tensor's name, seeds the randomized SVD")

    @field_validator("rank", mode="before")
    @classmethod
    def _nearest_rank(cls, v):
        """A rank read off a gradient across layers is rounded to the nearest whole rank (half up)."""
        return math.floor(v + 0.5) if isinstance(v, float) and math.isfinite(v) else v

    @model_validator(mode="after")
    def _rank_or_energy(self) -> "Params":
        if self.mode == "factors" and self.rank is None and self.energy is None:
            raise ValueError("give rank or energy: the rank kept, or the fraction of ‖tuned − base‖² kept")
        return self


def columns(rank: int, oversample: Optional[int]) -> int:
    """The randomized SVD's sketch: rank + oversample columns, 2·rank by default."""
    return rank + (rank if oversample is None else oversample)


def auto_randomized(rank: int, oversample: Optional[int], min_dim: int) -> bool:
    """Whether svd = "auto" runs the randomized SVD: its sketch (rank + oversample columns) is a small part of the
    spectrum, where a few power iterations make it as accurate as the full SVD and far faster."""
    return columns(rank, oversample) * RANDOMIZED_BELOW <= min_dim


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    (tuned,), base = tensors, ctx.base
    if params.mode == "whole":
        same = tuned.dtype == base.dtype and _same_bits(tuned, base)
        return torch.cat([tuned.reshape(-1).float(), tuned.new_full((1,), 0.0 if same else 1.0, dtype=torch.float32)])
    delta = tuned - base
    if params.transpose:
        delta = delta.T
    out, inn = delta.shape
    total = float(delta.double().square().sum())
    u, s, vh = _svd(delta, params, ctx.generator)
    energy = s.double().square()
    r = _chosen_rank(energy, total, params)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    flip = torch.where(u.gather(0, u.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)
    root = s.sqrt() * flip.reshape(-1)
    packed = delta.new_zeros((r + 1, inn + out), dtype=torch.float32)
    packed[:r, :inn] = vh * root[:, None]
    packed[:r, inn:] = (u * root[None, :]).T
    packed[r, 0] = total
    packed[r, 1] = float(energy[:r].sum())
    return packed


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() in (2, 4, 8):
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def _chosen_rank(energy: torch.Tensor, total: float, params: Params) -> int:
    cap = min(params.rank or len(energy), len(energy))
    if params.energy is None:
        return cap
    if total == 0.0:
        return 0
    held = torch.cumsum(energy, 0)
    enough = (held >= params.energy * total * (1 - 1e-12)).nonzero()
    return min(cap, int(enough[0]) + 1) if len(enough) else cap


def _svd(delta: torch.Tensor, params: Params, generator: Optional[torch.Generator]):
    """U, S, Vᵀ: all min(out, in) of them (full), or rank + oversample of them (randomized)."""
    k = min(delta.shape)
    rank = params.rank if params.rank is not None else k
    randomized = params.svd == "randomized" or (
        params.svd == "auto" and params.rank is not None and auto_randomized(rank, params.oversample, k))
    q = columns(rank, params.oversample)
    if not randomized or q >= k:
        return full_svd(delta)
    return randomized_svd(delta, q, params.power_iters, generator)


def full_svd(a: torch.Tensor):
    """torch.linalg.svd(a), of the tall one of a and aᵀ: LAPACK's divide and conquer is about twice as fast on a
    tall matrix as on the same matrix laid wide (measured on the CPU)."""
    if a.shape[0] >= a.shape[1]:
        return torch.linalg.svd(a, full_matrices=False)
    u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
    return vh.T, s, u.T


def randomized_svd(a: torch.Tensor, q: int, power_iters: int, generator: Optional[torch.Generator]):
    """torch.svd_lowrank(a, q, power_iters), its draws from the global RNG seeded from `generator` inside
    fork_rng, so that the result depends on the generator alone and the caller's RNG state is left as it was."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a, q=q, niter=power_iters)
    return u, s, v.T


def transient(numel: int, inputs: int, aux: bool) -> int:
    """Float32 copies of both inputs, Δ, and the SVD's U, Vᵀ and workspace (numel is the tensor's, not the result's)."""
    return 2 * 4 * numel * inputs + 4 * 4 * numel


# not OPERATOR: this module registers no operator a recipe can call (stdlib/__init__.py's INTERNAL_OPERATORS)
INTERNAL_OPERATOR = Operator(
    name="extract_lora",
    params=Params,
    merge=merge,
    doc="B, A with B·A the best rank-r approximation of tuned − base (truncated SVD)",
    reference="Eckart & Young 1936; Halko, Martinsson & Tropp 2011, arXiv:0909.4061",
    min_models=1,
    max_models=1,
    base="required",
    transient=transient,
)
