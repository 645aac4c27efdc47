"""DELLA (linear): prune each task vector δᵢ = xᵢ − base at random by magnitude rank (MagPrune): an entry is
kept with probability density − ε + 2ε·(r − 1)/(n − 1), where r = 1 … n is its rank by |δᵢ| ascending
within its row (along dimension 1; a 1-D tensor is one row); with ``rescale``, scale the survivors back to
the L1 norm of δᵢ; add λ·Σ wᵢδ̃ᵢ (divided by Σ wᵢ when ``normalize``) to base. No sign consensus.

density ± epsilon must lie in (0, 1) wherever density < 1; density 1 (the default) keeps everything.

Reference: Deep et al., "DELLA-Merging" (2024), arXiv:2406.11617; as mergekit's della_linear, with its
defaults (normalize off, rescale on, density 1, epsilon 0.15).

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

from typing import Optional, Sequence

import torch

from . import della
from . import sparsify as sp
from .operator import Operator


class Params(della.Params):
    """della's parameters, with normalize off by default and dividing by the sum of all the weights."""

    normalize: bool = sp.normalize_field(False)


def merge_deltas(
    deltas: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor], *, generator: torch.Generator
) -> torch.Tensor:
    weights, pruned = della.sparsified(deltas, params, generator, "della_linear")
    return base + sp.weighted_sum(pruned, weights, params.normalize, params.lambda_)


def merge(
    tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor], *, generator: torch.Generator
) -> torch.Tensor:
    return merge_deltas(sp.TaskVectors(tensors, base), params, base, generator=generator)


OPERATOR = Operator(
    name="della_linear",
    params=Params,
    merge=merge,
    doc="base + λ·Σ wᵢ·prune(δᵢ) (/ Σ wᵢ when normalize); prune keeps an entry with probability "
        "density ± epsilon rising with its magnitude rank in its row, rescaled to ‖δᵢ‖₁",
    reference="Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
              "Sampling, arXiv:2406.11617",
    min_models=1,
    base="required",
    per_model=("weights", "density", "epsilon"),
    random=True,
)
