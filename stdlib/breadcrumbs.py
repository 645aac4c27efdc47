"""Model Breadcrumbs: in each task vector δᵢ = xᵢ − base, drop the largest entries by |δᵢ| (the top
``gamma`` fraction, outliers) and the smallest, keeping ``density`` of the entries in between; with
``rescale``, scale the survivors back to the L1 norm of δᵢ; add λ·Σ wᵢδ̃ᵢ (divided by Σ wᵢ when
``normalize``) to base.

Exactly, as mergekit's magnitude_outliers: with N = numel, k = int(density·N) and t = int(gamma·N), the
entries are sorted by |δ| ascending and positions n_bot … n_bot + k − 1 are kept, where
n_bot = max(0, N − k − t): when density + gamma > 1 fewer than t outliers are dropped, so that k entries
remain. density 1 (the default) keeps everything, whatever gamma. Deterministic (no seed).

Reference: Davari & Belilovsky, "Model Breadcrumbs" (2023), arXiv:2312.06795; as mergekit's breadcrumbs
(no sign consensus), with its defaults (normalize off, rescale off, density 1, gamma 0.01), bit for bit.

Deliberate differences from mergekit: ``weights`` defaults to 1.0 for each model (mergekit requires
``weight``); mergekit's ``int8_mask`` is left out: it only changes the dtype of mergekit's masks, never a result.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from pydantic import Field, FiniteFloat

from . import sparsify as sp
from .operator import Operator, OpParams


class Params(OpParams):
    weights: Optional[list[FiniteFloat]] = sp.weights_field()
    density: Optional[list[sp.Density]] = sp.density_field(", below the outliers by magnitude")
    gamma: Optional[list[sp.Gamma]] = Field(
        None, description="fraction of each task vector's entries dropped as outliers, the largest by magnitude",
        json_schema_extra={"default_text": "0.01 each"},
    )
    normalize: bool = sp.normalize_field(False)
    rescale: bool = sp.rescale_field(False)
    lambda_: FiniteFloat = sp.lambda_field()


GAMMA = 0.01  # mergekit's default


def sparsified(
    deltas: Sequence[torch.Tensor], params: Params, op: str = "breadcrumbs"
) -> tuple[list[float], Iterator[torch.Tensor]]:
    """The weights, and the task vectors sparsified by magnitude outliers, one at a time."""
    weights, densities, gammas = sp.per_model_values(params, len(deltas), op, weights=1.0, density=1.0, gamma=GAMMA)
    return weights, (
        sp.magnitude_outliers(delta, d, g, params.rescale) for delta, d, g in zip(deltas, densities, gammas)
    )


def merge_deltas(deltas: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    weights, sparse = sparsified(deltas, params)
    return base + sp.weighted_sum(sparse, weights, params.normalize, params.lambda_)


def merge(tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    return merge_deltas(sp.TaskVectors(tensors, base), params, base)


OPERATOR = Operator(
    name="breadcrumbs",
    params=Params,
    merge=merge,
    doc="base + λ·Σ wᵢ·crumbs(δᵢ) (/ Σ wᵢ when normalize); crumbs drops the top gamma fraction of |δᵢ| "
        "and keeps the next density fraction",
    reference="Davari & Belilovsky 2023, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
              "arXiv:2312.06795",
    min_models=1,
    base="required",
    per_model=("weights", "density", "gamma"),
)
