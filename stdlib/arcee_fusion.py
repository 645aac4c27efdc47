"""Arcee Fusion: take the model's entries only where they matter: base + (x − base)·[s >= τ], as mergekit.

Importance sᵢⱼ = |xᵢⱼ − baseᵢⱼ| · KLᵢ with KLᵢ = Σⱼ pᵢⱼ·log(pᵢⱼ/qᵢⱼ), p = softmax(x) + 1e-8 and
q = softmax(base) + 1e-8 along the last dimension (one KL per row; a 1-D tensor is one row).
The threshold τ = Q₂ + 1.5·(Q₃ − Q₁) from the quartiles of s, where Qₖ is the element at index
⌊(k/4)·(n − 1)⌋ of the sorted entries.

mgc terms: ``arcee_fusion(x, base = b)``. mergekit 0.1.5 requires a ``base_model`` and exactly two inputs
counting it (``InputContract(base=REQUIRED, min_inputs=2, max_inputs=2)``); its kernel takes the base as
``tensors[0]`` and the other input as ``tensors[1]``, so mgc's base is mergekit's base_model and mgc's one
positional model is mergekit's other model.

Like mergekit, a tensor of more than 1,000,000 entries has its quartiles estimated from 1,000,000 entries
drawn uniformly with replacement; mergekit draws them from torch's global RNG, mgc from the per-tensor
generator seeded by ``seed``, so a recipe gives the same result on every run and device (the draws differ
from any mergekit run, whose own results vary from run to run). Smaller tensors use every entry: no draws.

Reference: Arcee AI, Arcee Fusion (https://arcee.ai, as implemented in mergekit's arcee_fusion).
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field

from .operator import MergeContext, Operator, OpParams

SAMPLE_SIZE = 1_000_000
SOFTMAX_EPS = 1e-8


class Params(OpParams):
    seed: int = Field(
        0, ge=0, description="seed of the subsample used for the quartiles of tensors with more than 1,000,000 entries"
    )


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x − base| times the KL divergence of softmax(x) from softmax(base), row by row."""
    p = torch.softmax(x, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (x - base).abs() * kl


def threshold(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁), the quartiles at sorted indices ⌊k(n − 1)/4⌋ (of a subsample past 1e6 entries)."""
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE_SIZE:
        idx = torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=generator)
        flat = flat[idx.to(flat.device)]
    ordered = torch.sort(flat).values
    m = ordered.numel() - 1
    q1, q2, q3 = ordered[m // 4], ordered[m // 2], ordered[3 * m // 4]
    return q2 + 1.5 * (q3 - q1)


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    (x,), base, generator = tensors, ctx.base, ctx.generator
    if generator is None:  # called outside the runtime: seed from the params alone
        generator = torch.Generator("cpu").manual_seed(params.seed)
    scores = importance(x, base)
    mask = (scores >= threshold(scores, generator)).to(x.dtype)
    return base + (x - base) * mask


OPERATOR = Operator(
    name="arcee_fusion",
    params=Params,
    merge=merge,
    doc="base + (x − base)·[s >= Q₂ + 1.5(Q₃ − Q₁)], s = |x − base|·KL(softmax(x) ‖ softmax(base)) per row",
    reference="Arcee AI, Arcee Fusion (mergekit arcee_fusion, https://arcee.ai)",
    min_models=1,
    max_models=1,
    base="required",
    shift_equivariant=True,  # |x − base| and softmax do not change under a common shift; base + (x − base)·mask
)
