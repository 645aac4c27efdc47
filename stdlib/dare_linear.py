"""DARE (linear): drop each entry of each task vector δᵢ = xᵢ − base at random, keeping it with probability
``density``; with ``rescale``, scale the survivors back to the L1 norm of δᵢ; add λ·Σ wᵢδ̃ᵢ (divided by
Σ wᵢ when ``normalize``) to base. The task-vector mechanism (task_vectors.py) with ``DARE`` and ``SUM``.

Reference: Yu et al., "Language Models are Super Mario" (2023), arXiv:2311.03099; as mergekit's dare_linear
(random sparsification, no sign consensus), with its defaults (normalize off, rescale on, density 1).

Deliberate differences from mergekit: those of the DARE keep rule (``task_vectors.DARE.deviations``).
"""
from __future__ import annotations

from . import task_vectors as tv

METHOD = tv.Method("dare_linear", keep=tv.DARE, combine=tv.SUM)
Params = METHOD.params(normalize=False, rescale=True)
merge, merge_deltas = METHOD.merge, METHOD.merge_deltas

OPERATOR = METHOD.operator(
    Params,
    doc="base + λ·Σ wᵢ·dare(δᵢ) (/ Σ wᵢ when normalize); dare keeps each entry with probability density, "
        "rescaled to ‖δᵢ‖₁",
    reference="Yu et al. 2023, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
              "as a Free Lunch, arXiv:2311.03099",
)
