"""A LoRA adapter's update of one tensor: W + s·B·A, or W + s·(B·A)ᵀ (``transpose``), s = scale·α/r or α/√r.

Internal: ``lora("adapter")`` lowers each adapted tensor to this operation (inputs: the base tensor, lora_A,
lora_B); a recipe cannot call it by name. ``transpose`` is peft's rule for GPT-2's Conv1D (``fan_in_fan_out``,
whose weight is stored [in, out]) and for embeddings (lora_embedding_A is [r, vocab], B [hidden, r]).

It runs ``"stored"``: W is read as stored and the result filled block of rows by block of rows, so neither a
float32 copy of W nor the whole B·A ever exists; A and B (r × one side each) are widened once.

Reference: Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685; as peft's
``merge_and_unload`` (rsLoRA: Kalajdzievski 2023, arXiv:2312.03732).
"""
from __future__ import annotations

from typing import Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field, FiniteFloat

from . import slices as sl
from .operator import MergeContext, Operator, OpParams


class Params(OpParams):
    scale: FiniteFloat = Field(..., description="the update's factor: lora()'s scale times α/r (α/√r with rsLoRA)")
    transpose: bool = Field(False, description="add (B·A)ᵀ: a Conv1D weight stored [in, out], or an embedding")


def merge(tensors: Sequence[torch.Tensor], params: Params, ctx: MergeContext) -> torch.Tensor:
    a, b = tensors
    base = ctx.base
    out = sl.result(base, ctx.out)
    # rows of the update: B·A = B[rows]·A, and (B·A)ᵀ = Aᵀ·Bᵀ
    left, right = (a.T, b.T) if params.transpose else (b, a)
    right = right.float()
    rows, cols = base.shape
    step = max(1, sl.slice_size(base.device) // max(cols, 1))
    for i in range(0, rows, step):
        j = min(i + step, rows)
        # out of place: base[i:j].float() is base itself when it is float32, which other users may still read
        out[i:j].copy_(torch.addmm(base[i:j].float(), left[i:j].float(), right, alpha=params.scale))
    return out


def transient(numel: int, inputs: int, aux: bool) -> int:
    """A block of rows widened, its update and its sum (A and B, r × one side each, are left out: small)."""
    return 3 * 4 * min(numel, sl.SLICE)


# not OPERATOR: this module registers no operator a recipe can call (stdlib/__init__.py's INTERNAL_OPERATORS)
INTERNAL_OPERATOR = Operator(
    name="lora",
    params=Params,
    merge=merge,
    doc="W + s·B·A (s·(B·A)ᵀ for Conv1D and embeddings), s = scale·α/r",
    reference="Hu et al. 2021, LoRA, arXiv:2106.09685; peft merge_and_unload",
    min_models=2,
    max_models=2,
    base="required",
    runs="stored",
    transient=transient,
)
