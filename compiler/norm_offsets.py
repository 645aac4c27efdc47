"""Norm weights stored as an offset from the gain the model applies: Gemma's RMSNorm multiplies by 1 + w and
stores w, around 0 (so do RecurrentGemma, VaultGemma, Qwen3-Next and Nemotron's LayerNorm1P).

An operator that commutes with a shift of all its inputs (linear, the task-vector methods: Operator.
shift_equivariant) gives the same gain whether it merges w or 1 + w, so such tensors are merged as stored, bit
for bit. One that does not (slerp, karcher, multislerp and nuslerp without a base, linear whose weights do not
sum to 1, passthrough with a scale) would act on the wrong quantity: an angle between two vectors near 0 is
not the angle between the gains near 1. For those, the runtime merges 1 + w and takes 1 off after
(ir.Apply.offset); the lowering decides here, per tensor.

Which tensors: in a model of a family below (config.json's model_type, or its text sub-config's), every tensor
named `...norm.weight` outside another modality's tower (a vision tower's LayerNorms store the gain itself),
less the family's exceptions. tests/test_norm_offsets.py checks each family against transformers' own modules.
"""
from __future__ import annotations

from typing import Mapping

from .layers import TEXT_CONFIGS

# model_type -> names (suffixes) of norm weights in that family that hold the gain itself
ZERO_CENTRED_NORMS: dict[str, tuple[str, ...]] = {
    "gemma": (), "gemma2": (), "gemma3": (), "gemma3_text": (), "recurrent_gemma": (), "vaultgemma": (),
    "nemotron": (),
    "qwen3_next": ("linear_attn.norm.weight",),  # its gated RMSNorm multiplies by w
}
OFFSET = 1.0
# towers of other modalities, whose norms are the usual LayerNorms even in a Gemma-family model (Gemma 3's and
# PaliGemma's SigLIP vision tower)
_TOWERS = ("vision", "visual", "image", "audio", "speech")


def family(config: Mapping) -> str | None:
    """The zero-centred-norm family of a config (its own model_type, or its text model's), or None."""
    subs = [config] + [config.get(k) for k in TEXT_CONFIGS]
    for sub in subs:
        if isinstance(sub, Mapping) and sub.get("model_type") in ZERO_CENTRED_NORMS:
            return sub["model_type"]
    return None


def stored_offset(config: Mapping, tensor: str) -> float:
    """c where the model applies tensor `tensor` as c + w (1.0 for a Gemma norm weight), else 0."""
    kind = family(config)
    if kind is None or not tensor.endswith("norm.weight"):
        return 0.0
    if any(word in tensor for word in _TOWERS) or tensor.endswith(ZERO_CENTRED_NORMS[kind]):
        return 0.0
    return OFFSET


def merge_offset(model, tensor: str) -> float:
    """The offset an operation (an OpModel) merges tensor `tensor` at: the stored offset where the operator does
    not commute with a shift for this tensor's parameters, else 0. Where the operator's result is exactly one of
    its inputs (slerp at t = 0: an identity the optimizer folds), 0 too, so that input is kept bit for bit."""
    op, params = model.op, model.resolved[tensor]
    if op.commutes_with_shift(params, model.base is not None):
        return 0.0
    if op.identity is not None and op.identity(params, len(model.models), bool(model.aux)) is not None:
        return 0.0
    source = model.config_source
    config = getattr(getattr(source, "checkpoint", None), "config", None)
    return stored_offset(config if isinstance(config, Mapping) else source.config(), tensor)
