"""NuSLERP: slerp of two models with t = w₁ / (w₀ + w₁) (0.5 when |w₀ + w₁| < 1e-6), as mergekit's nuslerp.

With cos θ = ⟨v₀, v₁⟩ / (max(‖v₀‖, 1e-7)·max(‖v₁‖, 1e-7)) clamped to [−1, 1]:
result = (sin((1−t)θ)·v₀ + sin(tθ)·v₁) / sin θ, or (1−t)·v₀ + t·v₁ when 1 − cos²θ <= 1e-16.
Without a base vᵢ are the two models; with one, vᵢ = xᵢ − base and base is added back.

The vectors slerped (``nuslerp_flatten`` first, then ``nuslerp_row_wise``, as mergekit):
  * flatten (default): the whole tensor is one vector;
  * flatten off, row_wise off: each vector along the last dimension (each row x[i, :] of a matrix);
  * flatten off, row_wise on: each vector along the first dimension (each column x[:, j] of a matrix;
    mergekit's name, which transposes dim 0 to the end before working on rows).
A 1-D tensor is one vector in every mode.

Reference: mergekit's nuslerp (Arcee AI), after Shoemake, "Animating rotation with quaternion curves" (1985).
Deviation from mergekit: weights default to 1.0 each, i.e. t = 0.5 (mergekit requires them).
The steps are mergekit's, in float32 and in its order, on purpose: the colinear test only fires when cos θ
rounds to exactly ±1 in float32, so exactly antiparallel vectors whose cos θ rounds to −0.99999994 take the
spherical branch at θ ≈ π − 3.5e-4 (giving about cos(tπ)·v₀ for v₁ = −v₀, not the lerp (1 − 2t)·v₀), and
mirroring the float32 rounding is the only way to agree with mergekit there.
"""
from __future__ import annotations

from typing import Optional, Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field, FiniteFloat

from .operator import MergeContext, Operator, OpParams

NORM_EPS = 1e-7  # mergekit clamps norms at this before normalising
COLINEAR_EPS = 1e-8  # colinear when 1 − cos²θ <= COLINEAR_EPS²


class Params(OpParams):
    weights: Optional[list[FiniteFloat]] = Field(
        None,
        description="one weight per model; t = w₁ / (w₀ + w₁), or 0.5 when the sum is ~0",
        json_schema_extra={"default_text": "1.0 each (t = 0.5)"},
    )
    nuslerp_flatten: bool = Field(True, description="slerp the whole tensor as one vector")
    nuslerp_row_wise: bool = Field(
        False, description="with nuslerp_flatten off: slerp the vectors along the first dimension instead of the last"
    )


def t_from_weights(weights: Optional[list[float]]) -> float:
    w0, w1 = weights or (1.0, 1.0)
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """Slerp of the vectors along ``dim`` (None: the whole tensor), in float32 step by step as mergekit."""
    shape = v0.shape
    if dim is None or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1.0, 1.0)
    del u0, u1
    colinear = (1 - cos * cos) <= COLINEAR_EPS**2
    theta = torch.arccos(torch.where(colinear, 0.0, cos))
    out = torch.sin((1 - t) * theta) * v0
    out.add_(torch.sin(t * theta) * v1).div_(torch.sin(theta))
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim is not None and dim != -1 and v0.dim() > 0:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    (x0, x1), base = tensors, ctx.base
    t = t_from_weights(params.weights)
    dim = None if params.nuslerp_flatten else (0 if params.nuslerp_row_wise else -1)
    if base is None:
        return nuslerp(t, x0, x1, dim)
    return nuslerp(t, x0 - base, x1 - base, dim).add_(base)


OPERATOR = Operator(
    name="nuslerp",
    params=Params,
    merge=merge,
    doc="(sin((1−t)θ)·v₀ + sin(tθ)·v₁)/sin θ, t = w₁/(w₀+w₁), vᵢ = xᵢ (− base, + base after) per tensor, row or column",
    reference="mergekit nuslerp (Arcee AI); slerp: Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
    min_models=2,
    max_models=2,
    base="optional",
    per_model=("weights",),
    shift_equivariant=lambda params, has_base: has_base,  # with a base, it works on the task vectors xᵢ − base
)
