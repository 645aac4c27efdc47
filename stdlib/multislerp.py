"""Multi-SLERP: barycentric interpolation of N tensors on the hypersphere, as mergekit's multislerp.

With xᵢ the models (or their task vectors xᵢ − base when a base is given), weights wᵢ (divided by Σ wᵢ
when ``normalize_weights``), uᵢ = xᵢ / (‖xᵢ‖ + ε) and m̂ = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖:

    τ = Σ wᵢ·(uᵢ − ⟨uᵢ, m̂⟩·m̂)                        (the weighted mean in the tangent space at m̂)
    result = (cos(‖τ‖ + ε)·m̂ + sin(‖τ‖ + ε)/(‖τ‖ + ε)·τ) · Σ wᵢ‖xᵢ‖   (+ base)

Note that τ vanishes in exact arithmetic (Σ wᵢ⟨uᵢ, m̂⟩ = ‖Σ wᵢuᵢ‖), so the result is m̂·Σ wᵢ‖xᵢ‖ up
to rounding; the tangent step is kept as mergekit writes it. When ‖Σ wᵢuᵢ‖ < ε (antipodal inputs
whose weights balance out) two models fall back to Σ wᵢxᵢ (+ base) and more are refused, as mergekit.

Reference: Goddard, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea); mergekit's multislerp.
Deviations from mergekit: weights default to 1.0 each (mergekit requires them); weights summing to 0 with
normalize_weights on are refused up front (mergekit divides by zero); scalars (norms, dot products) are
accumulated in float64; and N > 2 models whose weighted task vectors are all zero give the base (mergekit
raises, though every direction then has zero length and the merged task vector is 0).
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field, model_validator

from .fields import Weights, weights_field
from .operator import MergeContext, Operator, OpParams


class Params(OpParams):
    weights: Weights = weights_field("one weight per model (may be negative)")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, allow_inf_nan=False, description="ε added to norms for numerical stability")

    @model_validator(mode="after")
    def _nonzero_sum(self) -> "Params":
        if self.normalize_weights and self.weights is not None and abs(sum(self.weights)) < 1e-12:
            raise ValueError(
                "weights sum to 0, so normalize_weights=true would divide by zero; "
                "change the weights or set normalize_weights=false"
            )
        return self


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sum(a * b, dtype=torch.float64)


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    n, base = len(tensors), ctx.base
    if n == 1:
        return tensors[0].clone()
    xs = [x - base for x in tensors] if base is not None else list(tensors)
    w = torch.tensor(params.weights or [1.0] * n, dtype=torch.float64)
    if params.normalize_weights:
        w = w / w.sum()
    ws = w.tolist()
    eps = params.eps

    norms = [torch.linalg.vector_norm(x, dtype=torch.float64) for x in xs]
    scales = [(1.0 / (nrm + eps)).float() for nrm in norms]  # uᵢ = xᵢ·scaleᵢ

    mean = torch.zeros_like(xs[0])
    for x, s, wi in zip(xs, scales, ws):
        mean.add_(x * s, alpha=wi)
    mean_norm = torch.linalg.vector_norm(mean, dtype=torch.float64)
    if mean_norm < eps:
        if n == 2 or all(wi == 0 or nrm == 0 for wi, nrm in zip(ws, norms)):
            out = torch.zeros_like(xs[0])
            for x, wi in zip(xs, ws):
                out.add_(x, alpha=wi)
            return out + base if base is not None else out
        raise ValueError(
            "the weighted sum of the models' directions is zero (antipodal models whose weights "
            "balance out, e.g. a and -a with equal weights); change the weights"
        )
    mean.div_(mean_norm.float())

    # Weighted mean of the Log-map proxies uᵢ − ⟨uᵢ, m̂⟩·m̂ in the tangent space at m̂.
    tangent = torch.zeros_like(mean)
    for x, s, wi in zip(xs, scales, ws):
        u = x * s
        tangent.add_(u.sub_(mean * _dot(u, mean).float()), alpha=wi)
    t_norm = torch.linalg.vector_norm(tangent, dtype=torch.float64) + eps
    avg_norm = sum(wi * nrm for wi, nrm in zip(ws, norms))
    c_mean = (torch.cos(t_norm) * avg_norm).float()
    c_tangent = (torch.sin(t_norm) / t_norm * avg_norm).float()
    out = mean.mul_(c_mean).add_(tangent * c_tangent)
    return out.add_(base) if base is not None else out


OPERATOR = Operator(
    name="multislerp",
    params=Params,
    merge=merge,
    doc="(cos‖τ‖·m̂ + sin‖τ‖·τ/‖τ‖)·Σ wᵢ‖xᵢ‖, τ = Σ wᵢ(uᵢ − ⟨uᵢ,m̂⟩m̂), uᵢ = xᵢ/‖xᵢ‖, m̂ = Σ wᵢuᵢ/‖Σ wᵢuᵢ‖ (xᵢ − base, + base, with a base)",
    reference="Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); mergekit multislerp",
    min_models=1,
    base="optional",
    per_model=("weights",),
    shift_equivariant=lambda params, has_base: has_base,  # with a base, it works on the task vectors xᵢ − base
)
