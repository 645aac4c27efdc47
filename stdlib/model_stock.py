"""Model Stock: move from base towards the models' mean by t = N·cos θ / (1 + (N−1)·cos θ), as mergekit.

With task vectors δᵢ = xᵢ − base, cos θ is the mean over the N(N−1)/2 pairs i < j of
clamp(⟨δᵢ, δⱼ⟩ / max(‖δᵢ‖·‖δⱼ‖, 1e-6), −1, 1), and result = t·mean(xᵢ) + (1 − t)·base.
t is not clamped (a negative cos θ gives t < 0); where |1 + (N−1)·cos θ| < 1e-6 t = 0 (the base).
With ``filter_wise`` the angle, and so t, is taken for each vector along the last dimension (each row
of a matrix; a 1-D tensor is one vector); otherwise for the whole tensor.

Reference: Jang et al., "Model Stock: All we need is just a few fine-tuned models" (2024), arXiv:2403.19522;
as mergekit's model_stock. Deviation from mergekit: the dot products and norms are accumulated in float64
(mergekit: float32).
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field

from .operator import MergeContext, Operator, OpParams

NORM_FLOOR = 1e-6  # mergekit: ‖δᵢ‖·‖δⱼ‖ clamped at this
SINGULAR = 1e-6  # mergekit: |1 + (N−1)cos θ| below this keeps the base


class Params(OpParams):
    filter_wise: bool = Field(False, description="one ratio t per vector along the last dimension instead of per tensor")


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    n, base = len(tensors), ctx.base
    dim = -1 if params.filter_wise and base.dim() > 1 else None
    keep = dim is not None
    f64 = torch.float64
    deltas = [x - base for x in tensors]
    norms = [torch.linalg.vector_norm(d, dim=dim, keepdim=keep, dtype=f64) for d in deltas]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.sum(deltas[i] * deltas[j], dim=dim, keepdim=keep, dtype=f64)
            cos_sum += (dot / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1.0, 1.0)
            pairs += 1
    del deltas
    cos = cos_sum / pairs
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator)).float()
    average = torch.zeros_like(base)
    for x in tensors:
        average += x
    average /= n
    return average.mul_(t).add_(base * (1 - t))


OPERATOR = Operator(
    name="model_stock",
    params=Params,
    merge=merge,
    doc="t·mean(xᵢ) + (1−t)·base, t = N·cosθ/(1 + (N−1)·cosθ), cosθ = mean pairwise cos∠(xᵢ − base, xⱼ − base)",
    reference="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models, arXiv:2403.19522",
    min_models=2,
    base="required",
    per_model=(),
    shift_equivariant=True,  # t depends on the task vectors only, and t + (1 − t) = 1
)
