"""Task arithmetic: base + λ·Σ wᵢ(xᵢ − base), divided by Σ wᵢ when ``normalize`` is on.

The task-vector mechanism (task_vectors.py) with every entry kept (``NONE``) and summed (``SUM``):
accumulated model by model in float32, as mergekit's sum over its stacked deltas. Each entry of the result
depends only on the same entry of the inputs, so the runtime runs it slice by slice.

Reference: Ilharco et al., "Editing models with task arithmetic" (2023), arXiv:2212.04089; as mergekit's task_arithmetic.
"""
from __future__ import annotations

from . import task_vectors as tv

METHOD = tv.Method("task_arithmetic", keep=tv.NONE, combine=tv.SUM)
Params = METHOD.params(normalize=False, texts={
    "weights": "one weight per model",
    "normalize": "divide the weighted sum of task vectors by the sum of the weights",
})
merge, merge_deltas = METHOD.merge, METHOD.merge_deltas

OPERATOR = METHOD.operator(
    Params,
    doc="base + λ·Σ wᵢ(xᵢ − base) (/ Σ wᵢ when normalize)",
    reference="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
    runs="slices",
)
