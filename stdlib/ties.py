"""TIES: trim each task vector δᵢ = xᵢ − base to its top-density entries by |δᵢ|, elect a sign per entry
γ = sign(Σ wᵢδᵢ), and add λ·Σ wᵢδᵢ[agree] / Σ wᵢ[agree] (the disjoint mean) to base.

Reference: Yadav et al., "TIES-Merging" (2023), arXiv:2306.01708; as mergekit's ties (magnitude + sum consensus).
"""
from __future__ import annotations

from typing import Annotated, Optional, Sequence

import torch
from pydantic import Field, FiniteFloat

from .operator import Operator, OpParams


class Params(OpParams):
    weights: Optional[list[FiniteFloat]] = Field(
        None, description="one weight per model", json_schema_extra={"default_text": "1.0 each"}
    )
    density: Optional[list[Annotated[float, Field(gt=0.0, le=1.0)]]] = Field(
        None, description="fraction of each task vector's entries kept, by magnitude", json_schema_extra={"default_text": "1.0 each"}
    )
    normalize: bool = Field(True, description="divide by the sum of the weights of the models agreeing with the sign")
    lambda_: FiniteFloat = Field(1.0, alias="lambda", description="scale of the merged task vector")


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    k = int(density * delta.numel())  # floor, as mergekit
    if k == 0:
        raise ValueError(
            f"ties: density {density} keeps no entry of a tensor of {delta.numel()} elements "
            f"(int(density * numel) = 0); raise the density for this tensor"
        )
    # The same (unstable) argsort as mergekit, so ties in |δ| break the same way on the same device.
    keep = torch.argsort(delta.abs().reshape(-1), descending=True)[:k]
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[keep] = 1
    return delta * mask.reshape(delta.shape)


def merge(tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    n = len(tensors)
    densities = params.density or [1.0] * n
    deltas = torch.stack([_trim(x - base, d) for x, d in zip(tensors, densities)])
    w = torch.tensor(params.weights or [1.0] * n, dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *[1] * base.dim())
    weighted = deltas * w

    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)  # a zero sum elects +
    agree = (weighted.sign() == elected).to(weighted.dtype)  # zero entries never agree
    mixed = (weighted * agree).sum(dim=0)
    if params.normalize:
        divisor = (w * agree).sum(dim=0)
        mixed /= torch.where(divisor == 0, 1.0, divisor)
    if params.lambda_ != 1:
        mixed *= params.lambda_
    return base + mixed


OPERATOR = Operator(
    name="ties",
    params=Params,
    merge=merge,
    doc="base + λ·Σ wᵢ·trim(δᵢ)[sign = γ] / Σ wᵢ[sign = γ], γ = sign(Σ wᵢ·trim(δᵢ))",
    reference="Yadav et al. 2023, TIES-Merging: Resolving interference when merging models, arXiv:2306.01708",
    min_models=1,
    base="required",
    per_model=("weights", "density"),
)
