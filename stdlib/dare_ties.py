"""DARE-TIES: drop each entry of each task vector δᵢ = xᵢ − base at random, keeping it with probability
``density`` (with ``rescale``, scaled back to the L1 norm of δᵢ), then TIES' sign election γ = sign(Σ wᵢδ̃ᵢ)
and λ·Σ wᵢδ̃ᵢ[agree] (divided by Σ wᵢ[agree] when ``normalize``) added to base.

Reference: Yu et al., "Language Models are Super Mario" (2023), arXiv:2311.03099, with TIES' consensus
(Yadav et al. 2023, arXiv:2306.01708); as mergekit's dare_ties, with its defaults (normalize off,
rescale on, density 1).

Deliberate differences from mergekit:

* the masks are drawn on the CPU from the per-tensor ``generator`` (``seed`` and the tensor's name), so a
  seed gives the same masks on every device and in any order of work; mergekit draws ``torch.bernoulli``
  from the global torch RNG on the merge device. mgc's masks therefore differ from mergekit's draw for
  draw, but follow the same distribution (each entry kept independently with probability density);
* ``rescale`` is mergekit's: the kept entries are multiplied by ‖δᵢ‖₁ / ‖kept δᵢ‖₁ (whose expectation is
  the DARE paper's 1/density); mgc sums these two norms in float64 (mergekit: float32);
* ``weights`` defaults to 1.0 for each model (mergekit requires ``weight``);
* mergekit's ``int8_mask`` is left out: it only changes the dtype of mergekit's masks, never a result.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import dare_linear
from . import sparsify as sp
from .operator import Operator


class Params(dare_linear.Params):
    """dare_linear's parameters; normalize divides by the weights that agree with the elected sign."""

    normalize: bool = sp.normalize_field(False, "the weights of the models agreeing with the elected sign")


def merge_deltas(
    deltas: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor], *, generator: torch.Generator
) -> torch.Tensor:
    weights, sparse = dare_linear.sparsified(deltas, params, generator, "dare_ties")
    return base + sp.disjoint_merge(list(sparse), weights, params.normalize, params.lambda_)


def merge(
    tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor], *, generator: torch.Generator
) -> torch.Tensor:
    return merge_deltas(sp.TaskVectors(tensors, base), params, base, generator=generator)


OPERATOR = Operator(
    name="dare_ties",
    params=Params,
    merge=merge,
    doc="base + λ·Σ wᵢ·dare(δᵢ)[sign = γ] (/ Σ wᵢ[sign = γ] when normalize), γ = sign(Σ wᵢ·dare(δᵢ)); "
        "dare keeps each entry with probability density, rescaled to ‖δᵢ‖₁",
    reference="Yu et al. 2023, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
              "as a Free Lunch, arXiv:2311.03099",
    min_models=1,
    base="required",
    per_model=("weights", "density"),
    random=True,
)
