"""DELLA: prune each task vector δᵢ = xᵢ − base at random by magnitude rank (MagPrune): an entry is kept with
probability density − ε + 2ε·(r − 1)/(n − 1), where r = 1 … n is its rank by |δᵢ| ascending within its row
(along dimension 1; a 1-D tensor is one row), so the largest entries are the likeliest kept; with
``rescale``, scale the survivors back to the L1 norm of δᵢ; then TIES' sign election γ = sign(Σ wᵢδ̃ᵢ) and
λ·Σ wᵢδ̃ᵢ[agree] (divided by Σ wᵢ[agree] when ``normalize``) added to base. The task-vector mechanism
(task_vectors.py) with ``DELLA`` and ``TIES``.

density ± epsilon must lie in (0, 1) wherever density < 1; density 1 (the default) keeps everything.

Reference: Deep et al., "DELLA-Merging" (2024), arXiv:2406.11617; as mergekit's della, with its defaults
(normalize on, rescale on, density 1, epsilon 0.15).

Deliberate differences from mergekit: those of the DELLA keep rule (``task_vectors.DELLA.deviations``).
"""
from __future__ import annotations

from . import task_vectors as tv

METHOD = tv.Method("della", keep=tv.DELLA, combine=tv.TIES)
Params = METHOD.params(normalize=True, rescale=True)
merge, merge_deltas = METHOD.merge, METHOD.merge_deltas

OPERATOR = METHOD.operator(
    Params,
    doc="base + λ·Σ wᵢ·prune(δᵢ)[sign = γ] (/ Σ wᵢ[sign = γ] when normalize), γ = sign(Σ wᵢ·prune(δᵢ)); "
        "prune keeps an entry with probability density ± epsilon rising with its magnitude rank in its row, "
        "rescaled to ‖δᵢ‖₁",
    reference="Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
              "Sampling, arXiv:2406.11617",
)
