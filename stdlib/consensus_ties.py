"""Consensus TIES (TALL masks): TIES, keeping only the entries that at least k tasks need.

As ``consensus_ta`` (which states the TALL masks and the consensus), with τ the merged task vector of TIES: each
δᵢ = xᵢ − base trimmed to its top-density entries by magnitude, a sign elected per entry, and τ = λ·Σ wᵢδ̃ᵢ[agree]
(divided by Σ wᵢ[agree] when ``normalize``). The TALL masks compare the untrimmed δᵢ with τ, and

    result = base + τ·[#{i: |δᵢ| >= λᵢ·|τ − δᵢ|} >= k]

The trim needs whole tensors, so it runs "whole".

Reference: Wang et al., "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024),
arXiv:2405.07813 (TALL masks built on TIES, Consensus Merging with TIES); TIES: Yadav et al. 2023,
arXiv:2306.01708. Parameters and defaults as the mergekitty fork's ``consensus_ties`` (normalize on, rescale
off, density 1). Deliberate differences from mergekitty: those of ``consensus_ta``, and those of the MAGNITUDE
keep rule (``task_vectors.MAGNITUDE.deviations``).
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch

from . import task_vectors as tv
from .consensus_ta import consensus_params, merge_consensus, with_tall_lambda
from .operator import MergeContext, whole_transient

METHOD = tv.Method("consensus_ties", keep=tv.MAGNITUDE, combine=tv.TIES)
Params = consensus_params(METHOD.params(normalize=True, rescale=False, texts={
    "weights": "one weight per model",
    "normalize": "divide by the sum of the weights of the models agreeing with the sign",
    "rescale": "scale each trimmed task vector back to its original L1 norm",
}))


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    return merge_consensus(METHOD, tensors, params, ctx)


OPERATOR = with_tall_lambda(METHOD.operator(
    Params,
    doc="base + τ·[#{i: |δᵢ| >= λᵢ·|τ − δᵢ|} >= k], τ = ties' λ·Σ wᵢ·trim(δᵢ)[sign = γ] / Σ wᵢ[sign = γ], λᵢ = tall_lambda",
    reference="Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression "
              "(TALL masks, Consensus Merging), arXiv:2405.07813; mergekitty consensus_ties",
    merge=merge,
    runs="whole",
    # the merged vector, the counts and the result besides TIES' stacked task vectors
    transient=lambda numel, inputs, aux: whole_transient(numel, inputs, aux) + 4 * 4 * numel,
))
