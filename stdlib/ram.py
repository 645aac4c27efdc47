"""RAM (Reinforced Agent Merging): an entry changed by one model takes that model's change; an entry changed by
several takes the mean of their changes; an entry changed by none keeps the base.

With the task vectors δᵢ = xᵢ − base, an entry of δᵢ counts as changed where |δᵢ| > epsilon, and c is the number
of models that changed it:

    result = base + Σᵢ δᵢ·[|δᵢ| > ε]·(1 if c = 1, 1/c if c > 1)

Unlike task arithmetic's sum, a change that only one model made is not diluted by the models that left the entry
alone, and unlike a plain mean, the entries a model did not change do not count in its average. Each entry of the
result depends only on the same entry of the inputs, so the runtime runs it slice by slice. ``ramplus_tl`` (its
own module) adds a per-model rescaling of the unique entries.

Reference: "Reinforced Agent Merging", arXiv:2601.13572; as mergekit 0.1.5's ``ram``
(``merge_methods/ram.py``). The same arithmetic in float32, each model's term δᵢ·[changed]·(1 or 1/c)
added in model order as mergekit's sum over its stacked terms. Deliberate differences from mergekit: ``epsilon``
must be >= 0 (mergekit accepts any value; below 0 every entry counts as changed).
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field

from .operator import MergeContext, Operator, OpParams, slices_transient
from .slices import SLICE

EPSILON = 1e-5  # mergekit's default


def epsilon_field():
    return Field(
        EPSILON, ge=0.0, allow_inf_nan=False,
        description="an entry of a task vector counts as changed where its magnitude is above this",
    )


class Params(OpParams):
    epsilon: float = epsilon_field()


def changed_counts(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float) -> torch.Tensor:
    """c: per entry, how many models change it by more than epsilon (int32); one task vector held at a time."""
    count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for x in tensors:
        count += (x - base).abs() > epsilon
    return count


def term(delta: torch.Tensor, count: torch.Tensor, epsilon: float, unique_scale=None) -> torch.Tensor:
    """One model's term: δ where it is the only model changing the entry (times unique_scale, when given),
    δ/c where c > 1 models change it, 0 where it does not change it (or no model does)."""
    changed = delta * (delta.abs() > epsilon)
    unique = changed if unique_scale is None else changed * unique_scale
    return torch.where(count == 1, unique, changed / count.clamp(min=1))


def merge_with(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, count: torch.Tensor, unique_scales=None) -> torch.Tensor:
    """base + Σᵢ term(δᵢ), the terms added in model order."""
    total = None
    for i, x in enumerate(tensors):
        t = term(x - base, count, epsilon, None if unique_scales is None else unique_scales[i])
        if total is None:
            total = t
        else:
            total += t
    return base + total


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    base = ctx.base
    return merge_with(tensors, base, params.epsilon, changed_counts(tensors, base, params.epsilon))


OPERATOR = Operator(
    name="ram",
    params=Params,
    merge=merge,
    doc="base + Σ δᵢ·[|δᵢ| > ε]·(1 if c = 1 else 1/c), δᵢ = xᵢ − base, c = #{i: |δᵢ| > ε} per entry",
    reference="Reinforced Agent Merging, arXiv:2601.13572; mergekit ram",
    min_models=1,
    base="required",
    runs="slices",
    # the counts, the sum, and a task vector, its mask and its term at a time, one slice each
    transient=lambda numel, inputs, aux: slices_transient(numel, inputs, aux) + 4 * 4 * min(numel, SLICE),
    shift_equivariant=True,  # only the task vectors xᵢ − base enter, and the result is base + (…)
)
