"""Fisher-weighted averaging: per entry, θ = Σ αᵢ(Fᵢ + ε)·θᵢ / Σ αᵢ(Fᵢ + ε), αᵢ = wᵢ / Σ wₖ.

Reference: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022),
arXiv:2111.09832, eq. (3) with a diagonal Fisher: θ* = Σ λᵢFᵢθᵢ / Σ λᵢFᵢ.

``fisher = [fa, fb, ...]`` gives one Fisher model per input model: checkpoints with the same tensor
names and shapes as the models, holding the diagonal Fisher Fᵢ (non-negative; e.g. the mean of squared
gradients of the log-likelihood). It is required.

Zero Fisher entries. ε (``eps``, default 1e-8) is added to *every* Fᵢ, which with weights normalised
to sum 1 is the same as

    θ = (Σ αᵢFᵢθᵢ + ε·θ̄) / (Σ αᵢFᵢ + ε),   θ̄ = Σ αᵢθᵢ (the plain weighted mean):

ε is added to the denominator entrywise, as in the paper's implementation, and where Σ αᵢFᵢ = 0 the
result is the weighted mean θ̄ (the paper instead floors each Fᵢ at 1e-6). With ``eps = 0`` an entry
where Σ αᵢFᵢ = 0 also falls back to θ̄, and the result is then exactly invariant to scaling all Fishers
by one constant. ε is absolute: it matters only where Σ αᵢFᵢ is not much larger than ε, so Fishers
stored at a very small scale should be rescaled (or eps set to 0). Unlike the paper, Fishers are not
normalised per model: a per-tensor merge cannot see the whole model's Fisher norm; scale them upstream.

A model with weight 0 takes no part, whatever its Fisher. Math runs in float32 like ``linear``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field

from .fields import NormalisedWeights
from .operator import MergeContext, Operator


class Params(NormalisedWeights):
    eps: float = Field(
        1e-8, ge=0.0, allow_inf_nan=False,
        description="added to every Fisher entry: where all Fisher entries are 0 the result is the weighted mean",
    )


def check_fishers(name: str, fisher: Optional[Sequence[torch.Tensor]], tensors: Sequence[torch.Tensor]) -> None:
    """One non-negative Fisher tensor per model, each of its model's shape (shared with karcher)."""
    if fisher is None:
        raise ValueError(
            f"{name}() needs `fisher = [...]`: one diagonal-Fisher model per input model, in the same order"
        )
    if len(fisher) != len(tensors):
        raise ValueError(f"'fisher' has {len(fisher)} tensors for {len(tensors)} models: give one per model")
    for i, (f, t) in enumerate(zip(fisher, tensors)):
        if f.shape != t.shape:
            raise ValueError(f"'fisher' tensor {i + 1} has shape {list(f.shape)}, but its model's is {list(t.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError(f"'fisher' tensor {i + 1} holds NaN or Inf values")
        if (f < 0).any():
            raise ValueError(
                f"'fisher' tensor {i + 1} has negative entries (min {f.min().item():.4g}); "
                "a diagonal Fisher is non-negative"
            )


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    fisher = ctx.aux.get("fisher")
    check_fishers("fisher_merge", fisher, tensors)
    n = len(tensors)
    if n == 1:
        return tensors[0].clone()
    x0 = tensors[0]
    w = torch.tensor(params.weights or [1.0] * n, dtype=torch.float64)
    alpha = (w / w.sum()).tolist()
    eps = params.eps
    num = torch.zeros_like(x0, dtype=torch.float32)
    den = torch.zeros_like(x0, dtype=torch.float32)
    mean = torch.zeros_like(x0, dtype=torch.float32)
    for a, x, f in zip(alpha, tensors, fisher):
        if a == 0.0:
            continue
        x = x.to(torch.float32)
        af = f.to(torch.float32) * a
        num.addcmul_(af, x)
        den.add_(af)
        mean.add_(x, alpha=a)
    if eps > 0:
        num.add_(mean, alpha=eps)
        den.add_(eps)
    # where Σ αᵢFᵢ (+ ε) is 0 (only possible with eps = 0, or after underflow) the weighted mean stands in
    zero = den == 0
    out = num.div_(torch.where(zero, 1.0, den))
    return torch.where(zero, mean, out)


OPERATOR = Operator(
    name="fisher_merge",
    params=Params,
    merge=merge,
    doc="Σ αᵢ(Fᵢ+ε)·xᵢ / Σ αᵢ(Fᵢ+ε) per entry, Fᵢ the diagonal Fisher given by fisher = [...]",
    reference="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging, arXiv:2111.09832",
    min_models=1,
    per_model=("weights",),
    model_params=("fisher",),
    required_model_params=("fisher",),
    shift_equivariant=True,  # the per-entry weights αᵢ(Fᵢ+ε) are normalised to sum 1
)
