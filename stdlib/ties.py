"""TIES: trim each task vector δᵢ = xᵢ − base to its top-density entries by |δᵢ|, elect a sign per entry
γ = sign(Σ wᵢδᵢ), and add λ·Σ wᵢδᵢ[agree] / Σ wᵢ[agree] (the disjoint mean) to base.

Reference: Yadav et al., "TIES-Merging" (2023), arXiv:2306.01708; as mergekit's ties (magnitude + sum consensus).
"""
from __future__ import annotations

from typing import Annotated, Optional, Sequence

import torch
from pydantic import Field, FiniteFloat

from . import sparsify as sp
from .operator import Operator, OpParams


class Params(OpParams):
    weights: Optional[list[FiniteFloat]] = Field(
        None, description="one weight per model", json_schema_extra={"default_text": "1.0 each"}
    )
    density: Optional[list[Annotated[float, Field(gt=0.0, le=1.0)]]] = Field(
        None, description="fraction of each task vector's entries kept, by magnitude", json_schema_extra={"default_text": "1.0 each"}
    )
    normalize: bool = Field(True, description="divide by the sum of the weights of the models agreeing with the sign")
    rescale: bool = Field(False, description="scale each trimmed task vector back to its original L1 norm")
    lambda_: FiniteFloat = Field(1.0, alias="lambda", description="scale of the merged task vector")


def merge(tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    n = len(tensors)
    densities = sp.per_model(params.density, n, 1.0, "density", "ties")
    weights = sp.per_model(params.weights, n, 1.0, "weights", "ties")
    deltas = [sp.magnitude(x - base, d, params.rescale) for x, d in zip(tensors, densities)]
    return base + sp.disjoint_merge(deltas, weights, params.normalize, params.lambda_)


OPERATOR = Operator(
    name="ties",
    params=Params,
    merge=merge,
    doc="base + λ·Σ wᵢ·trim(δᵢ)[sign = γ] / Σ wᵢ[sign = γ], γ = sign(Σ wᵢ·trim(δᵢ))",
    reference="Yadav et al. 2023, TIES-Merging: Resolving interference when merging models, arXiv:2306.01708",
    min_models=1,
    base="required",
    per_model=("weights", "density"),
)
