"""Copy one model's tensor, optionally scaled: scale·x.

Used for `with` overrides and `stack` (layer selection needs no math). Reference: mergekit's passthrough.
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field, FiniteFloat

from .operator import MergeContext, Operator, OpParams


class Params(OpParams):
    scale: FiniteFloat = Field(1.0, description="factor applied to the tensor")


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    return tensors[0] * params.scale


OPERATOR = Operator(
    name="passthrough",
    params=Params,
    merge=merge,
    doc="scale·x",
    reference="mergekit passthrough (Goddard et al. 2024, arXiv:2403.13257)",
    min_models=1,
    max_models=1,
    runs="slices",
    identity=lambda params, n, aux: (0, "identity_passthrough") if params.scale == 1 else None,
    shift_equivariant=lambda params, has_base: params.scale == 1,
)
