"""Model Breadcrumbs: in each task vector δᵢ = xᵢ − base, drop the largest entries by |δᵢ| (the top
``gamma`` fraction, outliers) and the smallest, keeping ``density`` of the entries in between; with
``rescale``, scale the survivors back to the L1 norm of δᵢ; add λ·Σ wᵢδ̃ᵢ (divided by Σ wᵢ when
``normalize``) to base. The task-vector mechanism (task_vectors.py) with ``OUTLIERS`` and ``SUM``.

Exactly, as mergekit's magnitude_outliers: with N = numel, k = int(density·N) and t = int(gamma·N), the
entries are sorted by |δ| ascending and positions n_bot … n_bot + k − 1 are kept, where
n_bot = max(0, N − k − t): when density + gamma > 1 fewer than t outliers are dropped, so that k entries
remain. density 1 (the default) keeps everything, whatever gamma. Deterministic (no seed).

Reference: Davari & Belilovsky, "Model Breadcrumbs" (2023), arXiv:2312.06795; as mergekit's breadcrumbs
(no sign consensus), with its defaults (normalize off, rescale off, density 1, gamma 0.01), bit for bit.

Deliberate differences from mergekit: those of the OUTLIERS keep rule (``task_vectors.OUTLIERS.deviations``).
"""
from __future__ import annotations

from . import task_vectors as tv

METHOD = tv.Method("breadcrumbs", keep=tv.OUTLIERS, combine=tv.SUM)
Params = METHOD.params(normalize=False, rescale=False)
merge, merge_deltas = METHOD.merge, METHOD.merge_deltas

OPERATOR = METHOD.operator(
    Params,
    doc="base + λ·Σ wᵢ·crumbs(δᵢ) (/ Σ wᵢ when normalize); crumbs drops the top gamma fraction of |δᵢ| "
        "and keeps the next density fraction",
    reference="Davari & Belilovsky 2023, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
              "arXiv:2312.06795",
)
