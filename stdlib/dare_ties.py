"""DARE-TIES: drop each entry of each task vector δᵢ = xᵢ − base at random, keeping it with probability
``density`` (with ``rescale``, scaled back to the L1 norm of δᵢ), then TIES' sign election γ = sign(Σ wᵢδ̃ᵢ)
and λ·Σ wᵢδ̃ᵢ[agree] (divided by Σ wᵢ[agree] when ``normalize``) added to base. The task-vector mechanism
(task_vectors.py) with ``DARE`` and ``TIES``; dare_linear's parameters.

Reference: Yu et al., "Language Models are Super Mario" (2023), arXiv:2311.03099, with TIES' consensus
(Yadav et al. 2023, arXiv:2306.01708); as mergekit's dare_ties, with its defaults (normalize off,
rescale on, density 1).

Deliberate differences from mergekit: those of the DARE keep rule (``task_vectors.DARE.deviations``).
"""
from __future__ import annotations

from . import dare_linear
from . import task_vectors as tv

METHOD = tv.Method("dare_ties", keep=tv.DARE, combine=tv.TIES)
Params = METHOD.params(normalize=False, rescale=True, extends=dare_linear.Params)
merge, merge_deltas = METHOD.merge, METHOD.merge_deltas

OPERATOR = METHOD.operator(
    Params,
    doc="base + λ·Σ wᵢ·dare(δᵢ)[sign = γ] (/ Σ wᵢ[sign = γ] when normalize), γ = sign(Σ wᵢ·dare(δᵢ)); "
        "dare keeps each entry with probability density, rescaled to ‖δᵢ‖₁",
    reference="Yu et al. 2023, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
              "as a Free Lunch, arXiv:2311.03099",
)
