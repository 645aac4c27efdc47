"""TIES: trim each task vector δᵢ = xᵢ − base to its top-density entries by |δᵢ|, elect a sign per entry
γ = sign(Σ wᵢδᵢ), and add λ·Σ wᵢδᵢ[agree] / Σ wᵢ[agree] (the disjoint mean) to base.

Reference: Yadav et al., "TIES-Merging" (2023), arXiv:2306.01708; as mergekit's ties (magnitude + sum consensus).
"""
from __future__ import annotations

from typing import Annotated, Optional, Sequence

import torch
from pydantic import Field, FiniteFloat

from . import slices as sl
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


def merge_deltas(deltas: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    densities, weights = sp.per_model_values(params, len(deltas), "ties", density=1.0, weights=1.0)
    trimmed = [sp.magnitude(delta, d, params.rescale) for delta, d in zip(deltas, densities)]
    return base + sp.disjoint_merge(trimmed, weights, params.normalize, params.lambda_)


def merge(
    tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``merge_deltas`` of the xᵢ − base, bit for bit, from the tensors as stored: one float32 |δᵢ| at a time
    finds each model's cut, then the trim, sign election and disjoint mean run slice by slice."""
    if params.rescale:  # the L1 factors are sums over whole trimmed task vectors
        wide_base = base.float()
        deltas = sp.TaskVectors([t.float() for t in tensors], wide_base)
        return sl.result(base, out).copy_(merge_deltas(deltas, params, wide_base))
    densities, weights = sp.per_model_values(params, len(tensors), "ties", density=1.0, weights=1.0)
    flat, b = [t.reshape(-1) for t in tensors], base.reshape(-1)
    work = torch.empty(b.numel(), dtype=torch.float32, device=b.device)
    cuts = [sp.magnitude_cut(x, b, d, work) for x, d in zip(flat, densities)]
    del work
    res = sl.result(base, out)
    dest = res.view(-1)
    for start, stop in sl.spans(dest.numel(), sl.slice_size(dest.device)):
        part = b[start:stop].float()
        trimmed = []
        for x, cut in zip(flat, cuts):
            delta = x[start:stop].float() - part
            trimmed.append(delta if cut is None else delta * cut.mask(delta.abs(), start))
        dest[start:stop].copy_(part + sp.disjoint_merge(trimmed, weights, params.normalize, params.lambda_))
    return res


OPERATOR = Operator(
    name="ties",
    params=Params,
    merge=merge,
    native_inputs=True,
    doc="base + λ·Σ wᵢ·trim(δᵢ)[sign = γ] / Σ wᵢ[sign = γ], γ = sign(Σ wᵢ·trim(δᵢ))",
    reference="Yadav et al. 2023, TIES-Merging: Resolving interference when merging models, arXiv:2306.01708",
    min_models=1,
    base="required",
    per_model=("weights", "density"),
    scratch_bytes=lambda numel: 7 * numel,  # one float32 |δ| and three boolean masks while it finds the cut
)
