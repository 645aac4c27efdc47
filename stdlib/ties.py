"""TIES: trim each task vector δᵢ = xᵢ − base to its top-density entries by |δᵢ|, elect a sign per entry
γ = sign(Σ wᵢδᵢ), and add λ·Σ wᵢδᵢ[agree] / Σ wᵢ[agree] (the disjoint mean) to base. The task-vector
mechanism (task_vectors.py) with ``MAGNITUDE`` and ``TIES``, run from the tensors as stored.

Reference: Yadav et al., "TIES-Merging" (2023), arXiv:2306.01708; as mergekit's ties (magnitude + sum consensus).
Deliberate differences from mergekit: those of the MAGNITUDE keep rule (``task_vectors.MAGNITUDE.deviations``).
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch

from . import slices as sl
from . import sparsify as sp
from . import task_vectors as tv
from .operator import MergeContext, stored_transient

METHOD = tv.Method("ties", keep=tv.MAGNITUDE, combine=tv.TIES)
Params = METHOD.params(normalize=True, rescale=False, texts={
    "weights": "one weight per model",
    "normalize": "divide by the sum of the weights of the models agreeing with the sign",
    "rescale": "scale each trimmed task vector back to its original L1 norm",
})
merge_deltas = METHOD.merge_deltas


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    """``merge_deltas`` of the xᵢ − base, bit for bit, from the tensors as stored: one float32 |δᵢ| at a time
    finds each model's cut, then the trim, sign election and disjoint mean run slice by slice."""
    base = ctx.base
    if params.rescale:  # the L1 factors are sums over whole trimmed task vectors
        wide_base = base.float()
        deltas = tv.TaskVectors([t.float() for t in tensors], wide_base)
        return sl.result(base, ctx.out).copy_(merge_deltas(deltas, params, MergeContext(base=wide_base)))
    weights, densities = tv.per_model_values(params, len(tensors), "ties", weights=1.0, density=1.0)
    flat, b = [t.reshape(-1) for t in tensors], base.reshape(-1)
    cuts = [sp.magnitude_cut(x, b, d) for x, d in zip(flat, densities)]
    res = sl.result(base, ctx.out)
    dest = res.view(-1)
    for start, stop in sl.spans(dest.numel(), sl.slice_size(dest.device)):
        part = b[start:stop].float()
        trimmed = []
        for x, cut in zip(flat, cuts):
            delta = x[start:stop].float() - part
            trimmed.append(delta if cut is None else delta * cut.mask(delta.abs(), start))
        dest[start:stop].copy_(part + tv.disjoint_merge(trimmed, weights, params.normalize, params.lambda_))
    return res


OPERATOR = METHOD.operator(
    Params,
    doc="base + λ·Σ wᵢ·trim(δᵢ)[sign = γ] / Σ wᵢ[sign = γ], γ = sign(Σ wᵢ·trim(δᵢ))",
    reference="Yadav et al. 2023, TIES-Merging: Resolving interference when merging models, arXiv:2306.01708",
    merge=merge,
    runs="stored",
    streams=lambda params, aux: not params.rescale,  # rescaling needs whole trimmed task vectors
    # and the magnitude cut's two float32 slices, a slice's bits as int32 and int64, and its counts
    transient=lambda numel, inputs, aux: stored_transient(numel, inputs, aux) + 20 * min(numel, sl.SLICE) + (1 << 20),
)
