"""Layers of different kinds in one stack: a stack() whose config.json still says which layer is which.

Most models repeat one layer, but some mix kinds: Qwen2-MoE with `decoder_sparse_step = 2` alternates dense and
mixture-of-experts MLPs, DeepSeek's first `first_k_dense_replace` layers are dense, Llama 4 lists its expert
layers in `moe_layers`, Qwen3-Next mixes linear and full attention in `layer_types`. A layer's *kind* here is
what its tensors are: their names within the layer, and shapes.

stack() carries what the config says about each source layer to the layer's new place: the per-layer lists
(values.StackModel), the sparse step, restated as `decoder_sparse_step = 1` with the dense layers listed in
`mlp_only_layers`, and `first_k_dense_replace`, restated as the number of leading dense output layers (which
needs the dense layers first). That is enough when the description decides the kind (equal descriptions, equal
kinds, over every layer of every model the stack reads). Otherwise a stack of several kinds is accepted only
when each output layer has the kind of the first part's layer at its position; anything else is an error, as the
config would describe layers the tensors do not hold.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence

from mgc.core.errors import RecipeTypeError

from .layers import LAYER_INDEX_LISTS, PER_LAYER_LISTS, _split

SPARSE_STEP = "decoder_sparse_step"  # Qwen-MoE: every step-th layer has experts, less mlp_only_layers
FIRST_DENSE = "first_k_dense_replace"  # DeepSeek, GLM-4-MoE: the first k layers are dense


def kinds(model) -> dict[int, frozenset]:
    """Layer index (in the primary stack) -> its tensors' names within the layer and shapes."""
    memo = model.__dict__.get("_layer_kinds")
    if memo is None:
        found: dict[int, set] = {}
        for name, spec in model.tensors.items():
            i = model.layers.layer(name)
            if i is not None:
                found.setdefault(i, set()).add((_split(name)[2], tuple(spec.shape)))
        memo = model.__dict__["_layer_kinds"] = {i: frozenset(s) for i, s in found.items()}
    return memo


def text_config(model) -> dict:
    """The (sub-)config that states the primary stack's count, where per-layer descriptions live."""
    config = model.config()
    path = model.layers.primary.config_path if model.layers.primary is not None else None
    for key in (path or ())[:-1]:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else {}


def _count(value) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def experts(config: dict, i: int) -> Optional[bool]:
    """Whether the config's mixture-of-experts rule gives layer i experts; None without such a rule."""
    step = _count(config.get(SPARSE_STEP))
    if step is not None and step >= 1 and config.get("num_experts"):
        return (i + 1) % step == 0 and i not in (config.get("mlp_only_layers") or ())
    first_dense = _count(config.get(FIRST_DENSE))
    if first_dense is not None:
        return i >= first_dense
    return None


def description(config: dict, i: int) -> Hashable:
    """What the config says about layer i that stack() carries to the layer's new place."""
    lists = tuple(
        config[k][i] if isinstance(config.get(k), list) and i < len(config[k]) else None for k in PER_LAYER_LISTS
    )
    indices = tuple(i in (config.get(k) or ()) for k in LAYER_INDEX_LISTS if isinstance(config.get(k), list))
    return lists, indices, experts(config, i)


def check_layer_kinds(parts: Sequence) -> None:
    """Raise RecipeTypeError at the first part whose layers the stacked config could not describe."""
    first = parts[0].model
    sources = [(part, i) for part in parts for i in range(part.start, part.stop)]
    layer_kind = [kinds(part.model)[i] for part, i in sources]
    if len(set(layer_kind) | set(kinds(first).values())) <= 1:
        return
    if _described(parts):
        _check_dense_first(parts, sources)
        return
    first_kinds = kinds(first)
    for j, ((part, i), kind) in enumerate(zip(sources, layer_kind)):
        if first_kinds.get(j) != kind:
            raise RecipeTypeError(
                f"stack(): output layer {j} is layer {i} of this part, whose tensors differ from those of layer {j} "
                "of the first part's model, and its config.json cannot say which of its layers are of which kind",
                part.span,
                "the model mixes layers of several kinds (say dense and mixture-of-experts): keep each layer at a "
                "position of its own kind",
            )


def _described(parts: Sequence) -> bool:
    """Whether the per-layer description decides each layer's kind in every model the stack reads (every layer,
    not only those taken: a rule by position shows in a model's own layers)."""
    by_description: dict[Hashable, frozenset] = {}
    for model in {id(part.model): part.model for part in parts}.values():
        config = text_config(model)
        for i, kind in kinds(model).items():
            if by_description.setdefault(description(config, i), kind) != kind:
                return False
    return any(any(d[0]) or any(d[1]) or d[2] is not None for d in by_description)


def _check_dense_first(parts: Sequence, sources: Sequence) -> None:
    if _count(text_config(parts[0].model).get(FIRST_DENSE)) is None:
        return
    configs = {id(part): text_config(part.model) for part in parts}
    seen_experts = False
    for j, (part, i) in enumerate(sources):
        has = experts(configs[id(part)], i)
        if seen_experts and has is False:
            raise RecipeTypeError(
                f"stack(): output layer {j} is a dense layer after a mixture-of-experts layer, and config.json "
                f"({FIRST_DENSE}) can only say that the first layers are dense", part.span,
                "put the dense layers first",
            )
        seen_experts = seen_experts or bool(has)


def rewrite_expert_rules(where: dict, sources: Sequence, part_configs: dict) -> None:
    """The config's mixture-of-experts rule restated for the output's layers, each from its source's config."""
    if experts(where, 0) is None:
        return
    dense = [j for j, (part, i) in enumerate(sources) if experts(part_configs[id(part)], i) is False]
    if _count(where.get(SPARSE_STEP)) is not None and where.get("num_experts"):
        where[SPARSE_STEP] = 1
        where["mlp_only_layers"] = dense
    else:
        where[FIRST_DENSE] = len(dense)  # check_layer_kinds saw that they come first
