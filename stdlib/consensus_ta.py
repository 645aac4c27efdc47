"""Consensus task arithmetic (TALL masks): task arithmetic, keeping only the entries that at least k tasks need.

With the task vectors δᵢ = xᵢ − base and τ = λ·Σ wᵢδᵢ (divided by Σ wᵢ when ``normalize``) the merged task
vector of task arithmetic, each task's TALL mask marks the entries where its own change outweighs what the
merged vector gets wrong for it,

    mᵢ = [|δᵢ| >= λᵢ·|τ − δᵢ|]         (λᵢ: ``tall_lambda``, one per model)

and the consensus mask keeps the entries at least k tasks mark (k = 2 drops the "selfish" entries, which only
one task uses, and the "catastrophic" ones, which none does; k = 0 keeps everything: task arithmetic):

    result = base + τ·[Σᵢ mᵢ >= k]

Every quantity is per entry, so the runtime runs it slice by slice. ``consensus_ties`` (its own module) does the
same with TIES' merged vector.

Reference: Wang et al., "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024),
arXiv:2405.07813, §3 (TALL masks, eq. mᵢ = 1{|θ₀ − θᵢ| >= |θ_MTL − θᵢ|·λᵢ}) and §4 (Consensus Merging: the
consensus mask applied to the merged multi-task vector of TA or TIES, as in the authors' code). Parameters as
the mergekitty fork's ``consensus_ta`` (allura-org/mergekitty, ``merge_methods/generalized_task_arithmetic.py``
and ``sparsify.get_tall_mask``), which mergekit 0.1.5 does not have. Deliberate differences from mergekitty:

* its per-model ``lambda`` (the TALL λᵢ) is ``tall_lambda`` here, because ``lambda`` is the scale of the merged
  task vector in every mgc task-vector operator; λ scales τ before the masks are taken (θ_MTL is the merged
  model), and is 1 by default, where mergekitty has no such scale;
* ``k`` defaults to 2, the paper's choice, and is one number (mergekitty: per model, 1 by default, the first
  model's used);
* the mask is the paper's ``>=``; mergekitty and the authors' code use ``>``. They differ only where
  |δᵢ| = λᵢ·|τ − δᵢ| exactly (such as an entry no model changes, whose τ is 0 either way);
* ``weights`` defaults to 1.0 for each model (mergekitty requires ``weight``).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Optional, Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field, create_model

from . import task_vectors as tv
from .operator import MergeContext, OpParams, slices_transient
from .slices import SLICE

TallLambda = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


def consensus_params(params: type[OpParams]) -> type[OpParams]:
    """A task-vector method's Params with the TALL-mask parameters after its own."""
    return create_model(
        "Params", __base__=params, __module__=params.__module__,
        tall_lambda=(Optional[list[TallLambda]], Field(
            None, description="one λᵢ >= 0 per model: the TALL mask keeps |δᵢ| >= λᵢ·|τ − δᵢ|, τ the merged task vector",
            json_schema_extra={"default_text": "1.0 each"},
        )),
        k=(int, Field(2, ge=0, description="least number of TALL masks an entry must be in to be kept (0: all)")),
    )


def consensus_mask(deltas: Sequence[torch.Tensor], merged: torch.Tensor, params: OpParams, op: str) -> torch.Tensor:
    """[Σᵢ [|δᵢ| >= λᵢ·|τ − δᵢ|] >= k], the task vectors read one at a time."""
    (lambdas,) = tv.per_model_values(params, len(deltas), op, tall_lambda=1.0)
    count = torch.zeros(merged.shape, dtype=torch.int32, device=merged.device)
    for i, lam in enumerate(lambdas):
        d = deltas[i]
        count += d.abs() >= (merged - d).abs() * lam
    return count >= params.k


def merge_consensus(method: tv.Method, tensors: Sequence[torch.Tensor], params: OpParams, ctx: MergeContext) -> torch.Tensor:
    """base + τ·[consensus], τ the method's merged task vector (λ, weights and normalize applied)."""
    base = ctx.base
    deltas = tv.TaskVectors(tensors, base)
    weights, kept = method.keep.kept(deltas, params, ctx.generator, method.name)
    merged = method.combine.combine(kept, weights, params.normalize, params.lambda_)
    keep = consensus_mask(deltas, merged, params, method.name)
    return base + torch.where(keep, merged, torch.zeros_like(merged))


def with_tall_lambda(op):
    """The operator with ``tall_lambda`` among its per-model parameters."""
    return dataclasses.replace(op, per_model=(*op.per_model, "tall_lambda"))


METHOD = tv.Method("consensus_ta", keep=tv.NONE, combine=tv.SUM)
Params = consensus_params(METHOD.params(normalize=False, texts={
    "weights": "one weight per model",
    "normalize": "divide the weighted sum of task vectors by the sum of the weights",
}))


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    return merge_consensus(METHOD, tensors, params, ctx)


OPERATOR = with_tall_lambda(METHOD.operator(
    Params,
    doc="base + τ·[#{i: |δᵢ| >= λᵢ·|τ − δᵢ|} >= k], τ = λ·Σ wᵢδᵢ (/ Σ wᵢ when normalize), λᵢ = tall_lambda",
    reference="Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression "
              "(TALL masks, Consensus Merging), arXiv:2405.07813; mergekitty consensus_ta",
    merge=merge,
    runs="slices",
    # the merged vector, the counts, the result, and a task vector and its mask at a time, one slice each
    transient=lambda numel, inputs, aux: slices_transient(numel, inputs, aux) + 5 * 4 * min(numel, SLICE),
))
