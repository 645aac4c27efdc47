"""Spherical-proxy weighted Karcher mean: u* = argmin_u Σ αᵢ·d²(u, xᵢ/‖xᵢ‖) on the unit sphere
(fixed point of u ← Exp_u(Σ αᵢ·Log_u(uᵢ))), rescaled by Σ αᵢ‖xᵢ‖.

Reference: "Functionality-Oriented LLM Merging on the Fisher–Rao Manifold" (2026), arXiv:2603.04972, §3.3–3.4.
Unlike mergekit's karcher (equal weights only, computed in the input dtype, sources with ‖x‖ <= tol
dropped and those with θ < tol skipped) mgc takes per-model weights, iterates in float64, drops sources
with ‖x‖ <= 1e-8 and uses θ/sinθ → 1 instead of skipping small angles. Without Fisher, the iteration runs
on the coefficients of u in the span of the units (see ``_karcher_in_span``): the same iteration, on the
N×N Gram matrix, so its cost is two passes over the data whatever max_iter is.

Diagonal-Fisher preconditioning (``fisher = [fa, fb, ...]``, one Fisher model per input model; the
paper's "Connection to Fisher geometry": Fisher estimates as a natural-gradient-style preconditioning
inside the Log map). With uᵢ = xᵢ/‖xᵢ‖, αᵢ the weights normalised to sum 1 over the sources with a
direction (‖xᵢ‖ > 1e-8; the others get αᵢ = 0) and Fᵢ ≥ 0 the diagonal Fishers, each coordinate j gets
per-model weights normalised across the models:

    Wᵢ(j) = αᵢFᵢ(j) / Σₖ αₖFₖ(j)          where Σₖ αₖFₖ(j) > 0,
    Wᵢ(j) = αᵢ                             where Σₖ αₖFₖ(j) = 0 (no model has Fisher there),

so Σᵢ Wᵢ(j) = 1 for every j. One iteration, from u (‖u‖ = 1):

    Log_u(uᵢ) = θᵢ/sinθᵢ·(uᵢ − cosθᵢ·u),   cosθᵢ = ⟨u, uᵢ⟩   (0 for an antipodal source, as without Fisher)
    V = Σᵢ Wᵢ ⊙ Log_u(uᵢ)                 (⊙: per coordinate)
    T = V − ⟨V, u⟩·u                       (V projected onto the tangent space at u)
    u ← Exp_u(T) = cos‖T‖·u + sin‖T‖·T/‖T‖, renormalised; stop when ‖T‖ < tol.

The start is u₀ = normalise(Σᵢ Wᵢ ⊙ uᵢ) (the first direction-bearing source's if that is ~0), and the result is
u*·Σ αᵢ‖xᵢ‖ with αᵢ normalised over all sources, exactly as without Fisher: the Fisher reweights
directions, coordinate by coordinate, and leaves the norm rule alone.

Why: in coordinate j the step moves u toward the models that are sensitive there (high Fᵢ(j)), so each
expert's high-Fisher coordinates are protected from being averaged away by experts that do not care about
them. In the flat limit (Log_u(uᵢ) ≈ uᵢ − u) the fixed point is u ∝ Σᵢ Wᵢ ⊙ uᵢ: Fisher-weighted averaging
(Matena & Raffel 2022) of the directions. Because the weights are normalised per coordinate across models,
equal Fishers (F₁ = … = F_N = F, even if F varies over coordinates) give Wᵢ(j) = αᵢ and plain karcher up to
float rounding, scaling all Fishers by one constant changes nothing, and a coordinate where every Fisher is
0 falls back to αᵢ; no ε is needed since the weights are formed in float64 and an all-zero column is
detected exactly. Fishers must be non-negative (a ValueError otherwise). Without ``fisher`` the update is
exactly the plain one above.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field

from . import slices as sl
from .fields import NormalisedWeights
from .fisher_merge import check_fishers
from .operator import MergeContext, Operator, stored_transient

EPS = 1e-8


class Params(NormalisedWeights):
    max_iter: int = Field(10, ge=1, le=10_000, description="most fixed-point iterations")
    tol: float = Field(1e-5, gt=0, description="stop when the norm of the mean Log map is below this")


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    n, fisher, out = len(tensors), ctx.aux.get("fisher"), ctx.out
    if fisher is not None:
        check_fishers("karcher", fisher, tensors)
    if n == 1:
        return sl.result(tensors[0], out).copy_(tensors[0])
    if fisher is None:
        return _karcher_in_span(tensors, params, out)
    return sl.result(tensors[0], out).copy_(_karcher_with_fisher(tensors, params, fisher))


def _karcher_with_fisher(tensors: Sequence[torch.Tensor], params: Params, fisher: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Fisher-preconditioned iteration of the module docstring, on the dense [N, d] float64 units
    (per-coordinate weights take u out of the units' span, so the Gram form does not apply)."""
    n = len(tensors)
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

    fw = _fisher_weights(fisher, a)  # [n, d]: Wᵢ(j), each column sums to 1
    fwu = fw * units  # Wᵢ ⊙ uᵢ
    u = fwu.sum(dim=0)
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
        coef = torch.where(sinc > 1e-12, 1.0 / sinc, 0.0)
        v = coef @ fwu - ((coef * cos) @ fw) * u  # Σ Wᵢ ⊙ θᵢ/sinθᵢ·(uᵢ − cosθᵢ·u)
        tangent = v - (v @ u) * u  # onto the tangent space at u
        t_norm = torch.linalg.vector_norm(tangent)
        if t_norm < params.tol:
            break
        u = torch.cos(t_norm) * u + torch.sin(t_norm) * (tangent / t_norm)
        u = u / torch.linalg.vector_norm(u)

    return (scale * u).reshape(tensors[0].shape).to(torch.float32)


def _karcher_in_span(tensors: Sequence[torch.Tensor], params: Params, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The plain iteration, carried out on coefficients: u = Σ cᵢuᵢ stays in the span of the units, so
    every quantity it needs is a function of the units' Gram matrix. ⟨u, uᵢ⟩ = (Ĝc)ᵢ, the tangent
    T = Σ coefᵢuᵢ − (coef·cos)u has coefficients coef − (coef·cos)c and ‖T‖² = tᵀĜt. This is the same
    fixed-point iteration as the dense one, in float64, at the cost of one pass over the data for Ĝ and
    one for the result, with no [N, d] float64 copy."""
    n = len(tensors)
    gram = sl.gram(tensors).cpu()  # the N×N iteration runs on the CPU: no device syncs inside it
    norms = gram.diagonal().clamp_min(0).sqrt()
    w = torch.tensor(params.weights or [1.0] * n, dtype=torch.float64, device=gram.device)
    alpha = w / w.sum()
    scale = alpha @ norms

    valid = norms > EPS
    a = torch.where(valid, alpha, 0.0)
    if not a.sum() > 0:  # every source with weight has zero norm, so scale is ~0 too
        return sl.result(tensors[0], out).zero_()
    a = a / a.sum()
    inv = torch.where(valid, 1.0 / torch.where(valid, norms, 1.0), 0.0)
    unit_gram = gram * inv[:, None] * inv[None, :]  # Ĝᵢⱼ = ⟨uᵢ, uⱼ⟩ (0 for zero-norm sources)

    def norm_of(c: torch.Tensor) -> torch.Tensor:
        return (c @ unit_gram @ c).clamp_min(0).sqrt()

    c = a.clone()
    c_norm = norm_of(c)
    if c_norm < EPS:  # the directions cancel out (e.g. antipodal): start at the first valid one
        c = torch.zeros_like(a)
        c[int(valid.nonzero()[0])] = 1.0
    else:
        c = c / c_norm

    for _ in range(params.max_iter):
        cos = (unit_gram @ c).clamp_(-1.0, 1.0)
        theta = torch.arccos(cos)
        # θ/sinθ = 1/sinc(θ/π): exactly 1 at θ = 0. An antipodal source (θ = π) has no Log map; it adds nothing.
        sinc = torch.sinc(theta / math.pi)
        coef = torch.where(valid & (sinc > 1e-12), a / sinc, 0.0)
        tangent = coef - (coef @ cos) * c  # Σ αᵢ·θᵢ/sinθᵢ·(uᵢ − cosθᵢ·u), as coefficients of the units
        t_norm = norm_of(tangent)
        if t_norm < params.tol:
            break
        c = torch.cos(t_norm) * c + torch.sin(t_norm) * (tangent / t_norm)
        c = c / norm_of(c)

    coefficients = (scale * c * inv).tolist()  # result = scale·Σ cᵢ·xᵢ/‖xᵢ‖
    return sl.linear_combination(tensors, coefficients, out)


def _fisher_weights(fisher: Sequence[torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """Wᵢ(j) = aᵢFᵢ(j) / Σₖ aₖFₖ(j), or aᵢ where that sum is 0, as an [n, d] float64 matrix."""
    fw = torch.empty((len(fisher), fisher[0].numel()), dtype=torch.float64, device=a.device)
    for row, f in zip(fw, fisher):
        row.copy_(f.reshape(-1))
    fw.mul_(a[:, None])
    total = fw.sum(dim=0)
    none = total == 0
    fw.div_(torch.where(none, 1.0, total))
    if none.any():
        fw[:, none] = a[:, None]
    return fw


def _transient(numel: int, inputs: int, aux: bool) -> int:
    """With Fisher weights, the dense float64 [N, d] units and Fisher weights and the float32 result;
    without, what any "stored" operator holds."""
    return 2 * 8 * numel * inputs + 4 * numel if aux else stored_transient(numel, inputs, aux)


OPERATOR = Operator(
    name="karcher",
    params=Params,
    merge=merge,
    doc="u* = argmin_u Σ αᵢ·d²_sphere(u, xᵢ/‖xᵢ‖), result = u*·Σ αᵢ‖xᵢ‖",
    reference="Functionality-Oriented LLM Merging on the Fisher–Rao Manifold, arXiv:2603.04972 (§3.3–3.4)",
    min_models=1,
    per_model=("weights",),
    model_params=("fisher",),
    runs="stored",
    transient=_transient,
    streams=lambda params, aux: not aux,  # the Fisher-weighted iteration holds the dense units
    # karcher of one model copies it; with Fisher weights, merge() checks them first
    identity=lambda params, n, aux: (0, "single_source") if n == 1 and not aux else None,
    shift_equivariant=False,  # directions and norms change when every input moves
)
