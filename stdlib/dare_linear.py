"""DARE (linear): drop each entry of each task vector δᵢ = xᵢ − base at random, keeping it with probability
``density``; with ``rescale``, scale the survivors back to the L1 norm of δᵢ; add λ·Σ wᵢδ̃ᵢ (divided by
Σ wᵢ when ``normalize``) to base.

Reference: Yu et al., "Language Models are Super Mario" (2023), arXiv:2311.03099; as mergekit's dare_linear
(random sparsification, no sign consensus), with its defaults (normalize off, rescale on, density 1).

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

from typing import Iterator, Optional, Sequence

import torch
from pydantic import FiniteFloat

from . import sparsify as sp
from .operator import Operator, OpParams


class Params(OpParams):
    weights: Optional[list[FiniteFloat]] = sp.weights_field()
    density: Optional[list[sp.Density]] = sp.density_field(", at random")
    normalize: bool = sp.normalize_field(False)
    rescale: bool = sp.rescale_field(True)
    lambda_: FiniteFloat = sp.lambda_field()
    seed: int = sp.seed_field()


def sparsified(
    deltas: Sequence[torch.Tensor], params: Params, generator: torch.Generator, op: str = "dare_linear"
) -> tuple[list[float], Iterator[torch.Tensor]]:
    """The weights, and the task vectors sparsified by DARE, one at a time, in order (as they draw)."""
    weights, densities = sp.per_model_values(params, len(deltas), op, weights=1.0, density=1.0)
    return weights, (sp.dare(delta, d, params.rescale, generator) for delta, d in zip(deltas, densities))


def merge_deltas(
    deltas: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor], *, generator: torch.Generator
) -> torch.Tensor:
    weights, sparse = sparsified(deltas, params, generator)
    return base + sp.weighted_sum(sparse, weights, params.normalize, params.lambda_)


def merge(
    tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor], *, generator: torch.Generator
) -> torch.Tensor:
    return merge_deltas(sp.TaskVectors(tensors, base), params, base, generator=generator)


OPERATOR = Operator(
    name="dare_linear",
    params=Params,
    merge=merge,
    doc="base + λ·Σ wᵢ·dare(δᵢ) (/ Σ wᵢ when normalize); dare keeps each entry with probability density, "
        "rescaled to ‖δᵢ‖₁",
    reference="Yu et al. 2023, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
              "as a Free Lunch, arXiv:2311.03099",
    min_models=1,
    base="required",
    per_model=("weights", "density"),
    random=True,
)
