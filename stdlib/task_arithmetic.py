"""Task arithmetic: base + λ·Σ wᵢ(xᵢ − base), divided by Σ wᵢ when ``normalize`` is on.

Reference: Ilharco et al., "Editing models with task arithmetic" (2023), arXiv:2212.04089; as mergekit's task_arithmetic.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from pydantic import Field, FiniteFloat

from . import sparsify as sp
from .operator import Operator, OpParams


class Params(OpParams):
    weights: Optional[list[FiniteFloat]] = Field(
        None, description="one weight per model", json_schema_extra={"default_text": "1.0 each"}
    )
    normalize: bool = Field(False, description="divide the weighted sum of task vectors by the sum of the weights")
    lambda_: FiniteFloat = Field(1.0, alias="lambda", description="scale of the merged task vector")


def merge_deltas(deltas: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    weights = sp.per_model(params.weights, len(deltas), 1.0, "weights", "task_arithmetic")
    # Accumulated model by model in float32, as mergekit's sum over its stacked deltas.
    return base + sp.weighted_sum(deltas, weights, params.normalize, params.lambda_)


def merge(tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    return merge_deltas(sp.TaskVectors(tensors, base), params, base)


OPERATOR = Operator(
    name="task_arithmetic",
    params=Params,
    merge=merge,
    doc="base + λ·Σ wᵢ(xᵢ − base) (/ Σ wᵢ when normalize)",
    reference="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
    min_models=1,
    base="required",
    per_model=("weights",),
    elementwise=True,
)
