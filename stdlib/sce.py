"""SCE (select, calculate, erase): for the task vectors δᵢ = xᵢ − base,

1. select: with ``select_topk`` < 1, keep only the entries whose variance across the models (population
   variance, over i) is among the k largest, k = int(nnz(var)·select_topk) counted over the entries of
   nonzero variance (computed in float32, as mergekit), and zero the others in every δᵢ (k = 0 zeroes all);
2. calculate: a weight per model, mean(δᵢ²) / Σⱼ mean(δⱼ²) over the selected task vectors (1/n each when
   that sum is below 1e-6);
3. erase: elect a sign per entry, γ = sign(Σ δᵢ) (a zero sum elects +), and drop the entries that disagree;

and add Σ wᵢδᵢ[agree] / max(Σ wᵢ[agree], 1e-6) to base.

Reference: Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (2024), arXiv:2408.07990; as mergekit's
sce, with its default (select_topk 1: no selection), bit for bit.

Deliberate differences from mergekit: ``select_topk`` must lie in (0, 1] (mergekit also accepts 0 or less,
which zeroes every task vector and returns base, and values above 1, which select everything); mergekit's
``int8_mask`` is left out: it only changes the dtype of mergekit's masks, never a result.
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field

from .operator import MergeContext, Operator, OpParams
from .task_vectors import TaskVectors, sign_agreement


class Params(OpParams):
    select_topk: float = Field(
        1.0, gt=0.0, le=1.0,
        description="fraction of the entries (of nonzero variance across the models) kept, the most varying",
    )


def _select(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask (one tensor shape) of the int(nnz(var)·fraction) entries of largest variance over the models."""
    var = torch.var(deltas, dim=0, correction=0)
    nonzero = torch.count_nonzero(var).to(torch.float32)
    k = int(nonzero * torch.tensor(fraction, dtype=torch.float32))  # float32 product, as mergekit
    mask = torch.zeros_like(var)
    if k > 0:
        top = torch.topk(var.abs().reshape(-1), k=k, largest=True).indices
        mask.view(-1)[top] = 1
    return mask


def _model_weights(deltas: torch.Tensor) -> torch.Tensor:
    """mean(δᵢ²) / Σⱼ mean(δⱼ²), or 1/n each when the sum is below 1e-6."""
    n = deltas.shape[0]
    energy = deltas.square().reshape(n, -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / n
    return energy / total


def merge_deltas(deltas: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    base = ctx.base
    stacked = torch.stack(list(deltas))
    if params.select_topk < 1:
        stacked = stacked * _select(stacked, params.select_topk)
    agree = sign_agreement(stacked)
    w = _model_weights(stacked).reshape(-1, *[1] * base.dim()) * agree
    merged = (stacked * w).sum(dim=0)
    return base + merged / w.sum(dim=0).clamp(min=1e-6)


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    return merge_deltas(TaskVectors(tensors, ctx.base), params, ctx)


OPERATOR = Operator(
    name="sce",
    params=Params,
    merge=merge,
    doc="base + Σ wᵢ·sel(δᵢ)[sign = γ] / Σ wᵢ[sign = γ], sel keeps the select_topk most varying entries "
        "across models, wᵢ ∝ mean(sel(δᵢ)²), γ = sign(Σ sel(δᵢ))",
    reference="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models, arXiv:2408.07990",
    min_models=1,
    base="required",
    shift_equivariant=True,  # base + a function of the task vectors xᵢ − base
)
