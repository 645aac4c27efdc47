"""Model Breadcrumbs with TIES: sparsify each task vector δᵢ = xᵢ − base as breadcrumbs does (drop the top
``gamma`` fraction by |δᵢ| as outliers, keep the next ``density`` fraction; with ``rescale``, scale back to
the L1 norm of δᵢ), then TIES' sign election γ = sign(Σ wᵢδ̃ᵢ) and λ·Σ wᵢδ̃ᵢ[agree] (divided by
Σ wᵢ[agree] when ``normalize``) added to base.

Exactly, as mergekit's magnitude_outliers: with N = numel, k = int(density·N) and t = int(gamma·N), the
entries are sorted by |δ| ascending and positions n_bot … n_bot + k − 1 are kept, where
n_bot = max(0, N − k − t). density 1 (the default) keeps everything. Deterministic (no seed).

Reference: Davari & Belilovsky, "Model Breadcrumbs" (2023), arXiv:2312.06795, with TIES' consensus
(Yadav et al. 2023, arXiv:2306.01708); as mergekit's breadcrumbs_ties, with its defaults (normalize off,
rescale off, density 1, gamma 0.01), bit for bit.

Deliberate differences from mergekit: ``weights`` defaults to 1.0 for each model (mergekit requires
``weight``); mergekit's ``int8_mask`` is left out: it only changes the dtype of mergekit's masks, never a result.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import breadcrumbs
from . import sparsify as sp
from .operator import Operator


class Params(breadcrumbs.Params):
    """breadcrumbs' parameters; normalize divides by the weights that agree with the elected sign."""

    normalize: bool = sp.normalize_field(False, "the weights of the models agreeing with the elected sign")


def merge_deltas(deltas: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    weights, sparse = breadcrumbs.sparsified(deltas, params, "breadcrumbs_ties")
    return base + sp.disjoint_merge(list(sparse), weights, params.normalize, params.lambda_)


def merge(tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    return merge_deltas(sp.TaskVectors(tensors, base), params, base)


OPERATOR = Operator(
    name="breadcrumbs_ties",
    params=Params,
    merge=merge,
    doc="base + λ·Σ wᵢ·crumbs(δᵢ)[sign = γ] (/ Σ wᵢ[sign = γ] when normalize), γ = sign(Σ wᵢ·crumbs(δᵢ)); "
        "crumbs drops the top gamma fraction of |δᵢ| and keeps the next density fraction",
    reference="Davari & Belilovsky 2023, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
              "arXiv:2312.06795",
    min_models=1,
    base="required",
    per_model=("weights", "density", "gamma"),
)
