"""DELLA: prune each task vector δᵢ = xᵢ − base at random by magnitude rank (MagPrune): an entry is kept with
probability density − ε + 2ε·(r − 1)/(n − 1), where r = 1 … n is its rank by |δᵢ| ascending within its row
(along dimension 1; a 1-D tensor is one row), so the largest entries are the likeliest kept; with
``rescale``, scale the survivors back to the L1 norm of δᵢ; then TIES' sign election γ = sign(Σ wᵢδ̃ᵢ) and
λ·Σ wᵢδ̃ᵢ[agree] (divided by Σ wᵢ[agree] when ``normalize``) added to base.

density ± epsilon must lie in (0, 1) wherever density < 1; density 1 (the default) keeps everything.

Reference: Deep et al., "DELLA-Merging" (2024), arXiv:2406.11617; as mergekit's della, with its defaults
(normalize on, rescale on, density 1, epsilon 0.15).

Deliberate differences from mergekit:

* the masks are drawn on the CPU from the per-tensor ``generator`` (``seed`` and the tensor's name), so a
  seed gives the same masks on every device and in any order of work; mergekit draws ``torch.bernoulli``
  from the global torch RNG on the merge device. mgc's masks therefore differ from mergekit's draw for
  draw, but follow the same distribution (each entry kept independently with its rank's probability);
* entries of equal |δ| are ranked by position (a stable sort, the same on every device), where
  mergekit's unstable argsort may order them either way;
* a row of a single entry is kept with probability density (the middle of the range), where mergekit's
  rank normalisation divides 0 by 0 and torch.bernoulli fails;
* ``rescale`` is mergekit's: the kept entries are multiplied by ‖δᵢ‖₁ / ‖kept δᵢ‖₁ (the DELLA paper
  rescales by 1/pᵢ per entry); mgc sums these two norms in float64 (mergekit: float32);
* ``weights`` defaults to 1.0 for each model (mergekit requires ``weight``);
* an invalid density/epsilon pair is refused when the parameters are checked, not mid-merge;
* mergekit's ``int8_mask`` is left out: it only changes the dtype of mergekit's masks, never a result.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from pydantic import Field, FiniteFloat, ValidationInfo, field_validator

from . import sparsify as sp
from .operator import Operator, OpParams


class Params(OpParams):
    weights: Optional[list[FiniteFloat]] = sp.weights_field()
    density: Optional[list[sp.Density]] = sp.density_field(" on average, the larger entries likelier kept")
    epsilon: Optional[list[sp.Epsilon]] = Field(
        None, description="half-width of the range of keep probabilities, density ± epsilon, over magnitude ranks",
        json_schema_extra={"default_text": "0.15 each"}, validate_default=True,
    )
    normalize: bool = sp.normalize_field(True, "the weights of the models agreeing with the elected sign")
    rescale: bool = sp.rescale_field(True)
    lambda_: FiniteFloat = sp.lambda_field()
    seed: int = sp.seed_field()

    @field_validator("epsilon")
    @classmethod
    def _range(cls, v: Optional[list[float]], info: ValidationInfo) -> Optional[list[float]]:
        sp.check_della(info.data.get("density"), v)
        return v


def sparsified(
    deltas: Sequence[torch.Tensor], params: Params, generator: torch.Generator, op: str = "della"
) -> tuple[list[float], Iterator[torch.Tensor]]:
    """The weights, and the task vectors pruned by MagPrune, one at a time, in order (as they draw)."""
    weights, densities, epsilons = sp.per_model_values(
        params, len(deltas), op, weights=1.0, density=1.0, epsilon=sp.DELLA_EPSILON
    )
    return weights, (
        sp.della(delta, d, e, params.rescale, generator) for delta, d, e in zip(deltas, densities, epsilons)
    )


def merge_deltas(
    deltas: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor], *, generator: torch.Generator
) -> torch.Tensor:
    weights, pruned = sparsified(deltas, params, generator)
    return base + sp.disjoint_merge(list(pruned), weights, params.normalize, params.lambda_)


def merge(
    tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor], *, generator: torch.Generator
) -> torch.Tensor:
    return merge_deltas(sp.TaskVectors(tensors, base), params, base, generator=generator)


OPERATOR = Operator(
    name="della",
    params=Params,
    merge=merge,
    doc="base + λ·Σ wᵢ·prune(δᵢ)[sign = γ] (/ Σ wᵢ[sign = γ] when normalize), γ = sign(Σ wᵢ·prune(δᵢ)); "
        "prune keeps an entry with probability density ± epsilon rising with its magnitude rank in its row, "
        "rescaled to ‖δᵢ‖₁",
    reference="Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
              "Sampling, arXiv:2406.11617",
    min_models=1,
    base="required",
    per_model=("weights", "density", "epsilon"),
    random=True,
)
