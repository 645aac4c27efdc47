"""Spherical-proxy weighted Karcher mean: u* = argmin_u Σ αᵢ·d²(u, xᵢ/‖xᵢ‖) on the unit sphere
(fixed point of u ← Exp_u(Σ αᵢ·Log_u(uᵢ))), rescaled by Σ αᵢ‖xᵢ‖.

Reference: "Functionality-Oriented LLM Merging on the Fisher–Rao Manifold" (2026), arXiv:2603.04972, §3.3–3.4.
Unlike mergekit's karcher (equal weights only, computed in the input dtype, sources with ‖x‖ <= tol
dropped and those with θ < tol skipped) mgc takes per-model weights, iterates in float64, drops sources
with ‖x‖ <= 1e-8 and uses θ/sinθ → 1 instead of skipping small angles.
"""
from __future__ import annotations

import math
from typing import Annotated, Optional, Sequence

import torch
from pydantic import Field, field_validator

from .operator import Operator, OpParams

EPS = 1e-8


class Params(OpParams):
    weights: Optional[list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]]] = Field(
        None, description="one weight αᵢ >= 0 per model, normalised to sum 1", json_schema_extra={"default_text": "1.0 each"}
    )
    max_iter: int = Field(10, ge=1, description="most fixed-point iterations")
    tol: float = Field(1e-5, gt=0, description="stop when the norm of the mean Log map is below this")

    @field_validator("weights")
    @classmethod
    def _positive_sum(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and not sum(v) > 0:
            raise ValueError("weights must have a positive sum")
        return v


def merge(tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    n = len(tensors)
    if n == 1:
        return tensors[0].clone()
    x = torch.empty((n, tensors[0].numel()), dtype=torch.float64, device=tensors[0].device)
    for row, t in zip(x, tensors):
        row.copy_(t.reshape(-1))
    w = torch.tensor(params.weights or [1.0] * n, dtype=torch.float64, device=x.device)
    alpha = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=1)
    scale = alpha @ norms

    # Zero-norm sources have no direction: they drop out here but still count in `scale`.
    valid = norms > EPS
    units = x.div_(torch.where(valid, norms, 1.0)[:, None])  # in place: x is our own float64 copy
    a = torch.where(valid, alpha, 0.0)
    a_sum = a.sum()
    if not a_sum > 0:  # every source with weight has zero norm, so scale is ~0 too
        return torch.zeros_like(tensors[0])
    a = a / a_sum

    u = a @ units
    u_norm = torch.linalg.vector_norm(u)
    if u_norm < EPS:  # the directions cancel out (e.g. antipodal): start at the first valid one
        u = units[int(valid.nonzero()[0])].clone()
    else:
        u = u / u_norm

    for _ in range(params.max_iter):
        cos = (units @ u).clamp_(-1.0, 1.0)
        theta = torch.arccos(cos)
        # θ/sinθ = 1/sinc(θ/π): exactly 1 at θ = 0. An antipodal source (θ = π) has no Log map; it adds nothing.
        sinc = torch.sinc(theta / math.pi)
        coef = torch.where(sinc > 1e-12, a / sinc, 0.0)
        tangent = coef @ units - (coef @ cos) * u  # Σ αᵢ·θᵢ/sinθᵢ·(uᵢ − cosθᵢ·u)
        t_norm = torch.linalg.vector_norm(tangent)
        if t_norm < params.tol:
            break
        u = torch.cos(t_norm) * u + torch.sin(t_norm) * (tangent / t_norm)
        u = u / torch.linalg.vector_norm(u)

    return (scale * u).reshape(tensors[0].shape).to(torch.float32)


OPERATOR = Operator(
    name="karcher",
    params=Params,
    merge=merge,
    doc="u* = argmin_u Σ αᵢ·d²_sphere(u, xᵢ/‖xᵢ‖), result = u*·Σ αᵢ‖xᵢ‖",
    reference="Functionality-Oriented LLM Merging on the Fisher–Rao Manifold, arXiv:2603.04972 (§3.3–3.4)",
    min_models=1,
    per_model=("weights",),
)
