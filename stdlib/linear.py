"""Weighted average: Σ wᵢ·xᵢ / Σ wᵢ (or the plain weighted sum when ``normalize`` is off).

Reference: Wortsman et al., "Model soups" (2022), arXiv:2203.05482.
Unlike mergekit, weights summing to 0 with normalize on are refused up front instead of dividing by zero.
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field, model_validator

from . import slices as sl
from .fields import Weights, weights_field
from .operator import MergeContext, Operator, OpParams


class Params(OpParams):
    weights: Weights = weights_field("one weight per model (may be negative)")
    normalize: bool = Field(True, description="divide by the sum of the weights")

    @model_validator(mode="after")
    def _nonzero_sum(self) -> "Params":
        if self.normalize and self.weights is not None and abs(sum(self.weights)) < 1e-12:
            raise ValueError(
                "weights sum to 0, so normalize=true would divide by zero; "
                "change the weights or set normalize=false"
            )
        return self


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    # Σ wᵢ·xᵢ term by term, each product rounded before it is added, then / Σ wᵢ (all in float32, as
    # mergekit, for the same bits).
    w = torch.tensor(params.weights or [1.0] * len(tensors), dtype=torch.float32)
    divisor = float(w.sum()) if params.normalize else None
    return sl.linear_combination(tensors, w.tolist(), ctx.out, divisor)


OPERATOR = Operator(
    name="linear",
    params=Params,
    merge=merge,
    doc="Σ wᵢ·xᵢ / Σ wᵢ (Σ wᵢ·xᵢ when normalize=false)",
    reference="Wortsman et al. 2022, Model soups, arXiv:2203.05482",
    min_models=1,
    per_model=("weights",),
    runs="stored",
    streams=True,
    # 1·x, or 1·x / 1; not (3·x) / 3, which rounds
    identity=lambda params, n, aux: (0, "single_source") if n == 1 and (params.weights or [1.0])[0] == 1.0 else None,
    # Σ wᵢ(xᵢ + c) / Σ wᵢ = … + c; without normalize, only where the weights sum to 1
    shift_equivariant=lambda params, has_base: params.normalize or (
        params.weights is not None and abs(sum(params.weights) - 1.0) < 1e-12),
)
