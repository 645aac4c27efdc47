"""DELLA (linear): prune each task vector δᵢ = xᵢ − base at random by magnitude rank (MagPrune): an entry is
kept with probability density − ε + 2ε·(r − 1)/(n − 1), where r = 1 … n is its rank by |δᵢ| ascending
within its row (along dimension 1; a 1-D tensor is one row); with ``rescale``, scale the survivors back to
the L1 norm of δᵢ; add λ·Σ wᵢδ̃ᵢ (divided by Σ wᵢ when ``normalize``) to base. No sign consensus. The
task-vector mechanism (task_vectors.py) with ``DELLA`` and ``SUM``; della's parameters, with normalize off.

density ± epsilon must lie in (0, 1) wherever density < 1; density 1 (the default) keeps everything.

Reference: Deep et al., "DELLA-Merging" (2024), arXiv:2406.11617; as mergekit's della_linear, with its
defaults (normalize off, rescale on, density 1, epsilon 0.15).

Deliberate differences from mergekit: those of the DELLA keep rule (``task_vectors.DELLA.deviations``).
"""
from __future__ import annotations

from . import della
from . import task_vectors as tv

METHOD = tv.Method("della_linear", keep=tv.DELLA, combine=tv.SUM)
Params = METHOD.params(normalize=False, rescale=True, extends=della.Params)
merge, merge_deltas = METHOD.merge, METHOD.merge_deltas

OPERATOR = METHOD.operator(
    Params,
    doc="base + λ·Σ wᵢ·prune(δᵢ) (/ Σ wᵢ when normalize); prune keeps an entry with probability "
        "density ± epsilon rising with its magnitude rank in its row, rescaled to ‖δᵢ‖₁",
    reference="Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
              "Sampling, arXiv:2406.11617",
)
