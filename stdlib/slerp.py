"""Spherical interpolation of two tensors: with cos θ = ⟨x₀/‖x₀‖, x₁/‖x₁‖⟩,
result = sin((1−t)θ)/sin θ · x₀ + sin(tθ)/sin θ · x₁, or (1−t)·x₀ + t·x₁ when |cos θ| > 0.9995.

Reference: Shoemake, "Animating rotation with quaternion curves" (1985); formula as in mergekit's slerp
(its scalars taken in float64 here, float32 there; the two models come in order, no base).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from pydantic import Field

from .operator import Operator, OpParams

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class Params(OpParams):
    t: float = Field(..., ge=0.0, le=1.0, description="interpolation factor: 0 gives the first model, 1 the second")


def _norm_or_one(x: torch.Tensor) -> torch.Tensor:
    # mergekit normalises a tensor only when its norm exceeds eps; otherwise it is used as is.
    n = torch.linalg.vector_norm(x, dtype=torch.float64)
    return torch.where(n > EPS, n, torch.ones_like(n))


def merge(tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    v0, v1 = tensors
    t = params.t
    # The scalars are taken in float64 (mergekit: float32 numpy), and the branch is a torch.where
    # so that nothing syncs with the device.
    dot = torch.sum(v0 * v1, dtype=torch.float64) / (_norm_or_one(v0) * _norm_or_one(v1))
    theta = torch.arccos(dot.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    parallel = dot.abs() > DOT_THRESHOLD
    theta_t = theta * t
    c0 = torch.where(parallel, 1.0 - t, torch.sin(theta - theta_t) / sin_theta)
    c1 = torch.where(parallel, t, torch.sin(theta_t) / sin_theta)
    return c0.float() * v0 + c1.float() * v1


OPERATOR = Operator(
    name="slerp",
    params=Params,
    merge=merge,
    doc="sin((1−t)θ)/sinθ·x₀ + sin(tθ)/sinθ·x₁, θ = ∠(x₀, x₁); lerp when |cos θ| > 0.9995",
    reference="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
    min_models=2,
    max_models=2,
)
