"""Model Breadcrumbs with TIES: sparsify each task vector δᵢ = xᵢ − base as breadcrumbs does (drop the top
``gamma`` fraction by |δᵢ| as outliers, keep the next ``density`` fraction; with ``rescale``, scale back to
the L1 norm of δᵢ), then TIES' sign election γ = sign(Σ wᵢδ̃ᵢ) and λ·Σ wᵢδ̃ᵢ[agree] (divided by
Σ wᵢ[agree] when ``normalize``) added to base. The task-vector mechanism (task_vectors.py) with
``OUTLIERS`` and ``TIES``; breadcrumbs' parameters.

Exactly, as mergekit's magnitude_outliers: with N = numel, k = int(density·N) and t = int(gamma·N), the
entries are sorted by |δ| ascending and positions n_bot … n_bot + k − 1 are kept, where
n_bot = max(0, N − k − t). density 1 (the default) keeps everything. Deterministic (no seed).

Reference: Davari & Belilovsky, "Model Breadcrumbs" (2023), arXiv:2312.06795, with TIES' consensus
(Yadav et al. 2023, arXiv:2306.01708); as mergekit's breadcrumbs_ties, with its defaults (normalize off,
rescale off, density 1, gamma 0.01), bit for bit.

Deliberate differences from mergekit: those of the OUTLIERS keep rule (``task_vectors.OUTLIERS.deviations``).
"""
from __future__ import annotations

from . import breadcrumbs
from . import task_vectors as tv

METHOD = tv.Method("breadcrumbs_ties", keep=tv.OUTLIERS, combine=tv.TIES)
Params = METHOD.params(normalize=False, rescale=False, extends=breadcrumbs.Params)
merge, merge_deltas = METHOD.merge, METHOD.merge_deltas

OPERATOR = METHOD.operator(
    Params,
    doc="base + λ·Σ wᵢ·crumbs(δᵢ)[sign = γ] (/ Σ wᵢ[sign = γ] when normalize), γ = sign(Σ wᵢ·crumbs(δᵢ)); "
        "crumbs drops the top gamma fraction of |δᵢ| and keeps the next density fraction",
    reference="Davari & Belilovsky 2023, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
              "arXiv:2312.06795",
)
