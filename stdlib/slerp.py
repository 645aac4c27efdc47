"""Spherical interpolation of two tensors: with cos θ = ⟨x₀/‖x₀‖, x₁/‖x₁‖⟩,
result = sin((1−t)θ)/sin θ · x₀ + sin(tθ)/sin θ · x₁, or (1−t)·x₀ + t·x₁ when |cos θ| > 0.9995.

Reference: Shoemake, "Animating rotation with quaternion curves" (1985); formula as in mergekit's slerp
(its scalars taken in float64 here, float32 there; the two models come in order, no base).
"""
from __future__ import annotations

import math
from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field

from . import slices as sl
from .operator import MergeContext, Operator, OpParams

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class Params(OpParams):
    t: float = Field(..., ge=0.0, le=1.0, description="interpolation factor: 0 gives the first model, 1 the second")


def coefficients(gram: torch.Tensor, t: float) -> tuple[float, float]:
    """(c₀, c₁) from the float64 Gram matrix [[‖x₀‖², ⟨x₀,x₁⟩], [⟨x₀,x₁⟩, ‖x₁‖²]] (on the CPU)."""
    # mergekit normalises a tensor only when its norm exceeds eps; otherwise it is used as is.
    n0, n1 = (n if n > EPS else 1.0 for n in gram.diagonal().clamp_min(0).sqrt().tolist())
    dot = float(gram[0, 1]) / (n0 * n1)
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, dot)))
    # taken in float64 (mergekit: float32 numpy), then used as float32 factors
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    # One pass for the Gram matrix (moved to the CPU once: the scalar math never syncs a device again),
    # one for c₀·x₀ + c₁·x₁.
    c0, c1 = coefficients(sl.gram(tensors).cpu(), params.t)
    return sl.linear_combination(tensors, (c0, c1), ctx.out)


OPERATOR = Operator(
    name="slerp",
    params=Params,
    merge=merge,
    doc="sin((1−t)θ)/sinθ·x₀ + sin(tθ)/sinθ·x₁, θ = ∠(x₀, x₁); lerp when |cos θ| > 0.9995",
    reference="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
    min_models=2,
    max_models=2,
    runs="stored",
    streams=True,
    identity=lambda params, n, aux: (0, "slerp_t0") if params.t == 0 else (1, "slerp_t1") if params.t == 1 else None,
    shift_equivariant=False,  # the angle between x₀ and x₁ changes when both move
)
