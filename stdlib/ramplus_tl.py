"""RAM+ (tensor-local): ``ram``, with each model's unique entries scaled up by how much of its change it shares.

With the task vectors δᵢ = xᵢ − base, an entry of δᵢ counts as changed where |δᵢ| > epsilon, and c is the number of
models that changed it (as in ``ram``). Per model i and per tensor, Sᵢ counts the entries it changes that others
change too (c > 1), Uᵢ those only it changes (c = 1), and

    ρᵢ = Sᵢ / max(Uᵢ, ε),   λᵢ = 1 + r·clamp(ρᵢ, 0, alpha)
    result = base + Σᵢ δᵢ·[|δᵢ| > ε]·(λᵢ if c = 1, 1/c if c > 1)

A model whose change mostly overlaps with the others' has the little it changes alone scaled by up to 1 + r·alpha,
which makes up for the overlap's being averaged. ρᵢ and λᵢ are computed per tensor ("tensor-local"), so the
operator needs whole tensors: it runs "whole".

Reference: "Reinforced Agent Merging", arXiv:2601.13572; as mergekit 0.1.5's ``ramplus_tl``
(``merge_methods/ram.py``): ρᵢ and λᵢ in float32 as there, each model's term added in model order. Deliberate
differences from mergekit: ``epsilon``, ``r`` and ``alpha`` must be >= 0 (mergekit accepts any values; with alpha
< 0 torch's clamp gives every model λ = 1 + r·alpha).
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field

from . import ram
from .operator import MergeContext, Operator, OpParams, whole_transient


class Params(OpParams):
    r: float = Field(0.1, ge=0.0, allow_inf_nan=False, description="strength of the boost of each model's unique entries")
    alpha: float = Field(0.2, ge=0.0, allow_inf_nan=False, description="largest ratio ρ of shared to unique entries counted")
    epsilon: float = ram.epsilon_field()


def unique_scales(tensors: Sequence[torch.Tensor], base: torch.Tensor, count: torch.Tensor, params: Params) -> torch.Tensor:
    """λᵢ = 1 + r·clamp(Sᵢ / max(Uᵢ, ε), 0, alpha) for each model, a float32 tensor of one value per model."""
    shared, unique = [], []
    for x in tensors:
        changed = (x - base).abs() > params.epsilon
        shared.append(int((changed & (count > 1)).sum()))
        unique.append(int((changed & (count == 1)).sum()))
    s = torch.tensor(shared, dtype=torch.int64, device=base.device)
    u = torch.tensor(unique, dtype=torch.int64, device=base.device)
    rho = s / u.clamp(min=params.epsilon)  # float32, as mergekit
    return 1 + params.r * rho.clamp(min=0, max=params.alpha)


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    base = ctx.base
    count = ram.changed_counts(tensors, base, params.epsilon)
    scales = unique_scales(tensors, base, count, params)
    return ram.merge_with(tensors, base, params.epsilon, count, scales)


OPERATOR = Operator(
    name="ramplus_tl",
    params=Params,
    merge=merge,
    doc="base + Σ δᵢ·[|δᵢ| > ε]·(λᵢ if c = 1 else 1/c), λᵢ = 1 + r·clamp(Sᵢ / max(Uᵢ, ε), 0, alpha), "
        "Sᵢ, Uᵢ = #entries model i changes with others, alone (per tensor)",
    reference="Reinforced Agent Merging, arXiv:2601.13572; mergekit ramplus_tl",
    min_models=1,
    base="required",
    runs="whole",
    # the counts, the sum, and a task vector, its masks and its term at a time
    transient=lambda numel, inputs, aux: whole_transient(numel, inputs, aux) + 6 * 4 * numel,
    shift_equivariant=True,  # only the task vectors xᵢ − base enter, and the result is base + (…)
)
