"""NearSwap: take the model's value where it is near the base: w·x + (1 − w)·base, w = clamp(t / |x − base|, 0, 1).

|x − base| is floored at 1e-6 first, so entries within t of the base take the model's value outright and
farther ones move towards it by t/|x − base|.

mgc terms: ``nearswap(x, base = b, t = ...)``. mergekit 0.1.5 requires a ``base_model`` and exactly two inputs
counting it; its kernel's ``a`` is the base and ``b`` the other model, which here is the one positional model.

Reference: alchemonaut, QuartetAnemoi-70B-t0.0001 (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001);
as mergekit's nearswap. Deviation from mergekit: t must be > 0 (mergekit accepts any t; t <= 0 gives the base).
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field

from .operator import MergeContext, Operator, OpParams

DIFF_FLOOR = 1e-6


class Params(OpParams):
    t: float = Field(..., gt=0.0, allow_inf_nan=False, description="distance from the base within which the model's value is taken")


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    (x,), base = tensors, ctx.base
    w = (params.t / (base - x).abs().clamp(min=DIFF_FLOOR)).clamp(0.0, 1.0)
    return w * x + (1 - w) * base


OPERATOR = Operator(
    name="nearswap",
    params=Params,
    merge=merge,
    doc="w·x + (1−w)·base, w = clamp(t / max(|x − base|, 1e-6), 0, 1)",
    reference="alchemonaut, QuartetAnemoi-70B-t0.0001 (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); mergekit nearswap",
    min_models=1,
    max_models=1,
    base="required",
    shift_equivariant=True,  # w depends on |x − base|, and w + (1 − w) = 1
)
