"""Lowering: checked symbolic models -> the tensor graph, one save node per output tensor.

Each (model value, tensor) pair is lowered once, so a variable used twice is shared;
equal computations written twice stay separate here and are merged by the CSE pass.
"""
from __future__ import annotations

from .check import Program
from .ir import Apply, Graph, Load, Save
from .heads import HeadView
from .layers import tensor_order
from .norm_offsets import merge_offset
from .extract_lora import lower_adapter
from .lora import LoraModel, lower_lora
from .moe import MoeModel
from .values import CheckpointModel, FisherModel, ModelValue, OpModel, StackModel, WithModel
from .vocab_lower import lower_save_tensor, save_tensors


def lower(program: Program) -> Graph:
    g = Graph()
    memo: dict[tuple[int, str], int] = {}
    for save in program.saves:
        if save.adapter is not None:  # extract_lora(): factors and whole tensors, written by runtime/adapter_out.py
            lower_adapter(g, memo, save, _lower)
            continue
        tensors = save_tensors(save)  # a save that aligns a vocabulary writes its own shapes
        for name in sorted(tensors, key=tensor_order):
            spec = tensors[name]
            src = lower_save_tensor(g, memo, save, name, _lower)
            dtype = save.dtype if spec.dtype.is_floating_point else spec.dtype
            g.add(Save(save.path, name, spec.shape, dtype), (src,))
    return g.freeze()


def _lower(g: Graph, memo: dict, model: ModelValue, name: str) -> int:
    key = (id(model), name)
    if key in memo:
        return memo[key]
    if isinstance(model, CheckpointModel):
        info = model.checkpoint.tensors[name]
        n = g.add(Load(model.checkpoint.path, name, info.shape, info.dtype))
    elif isinstance(model, FisherModel):  # its cache folder, written before the run by mgc.fisher
        spec = model.tensors[name]
        n = g.add(Load(model.cache_path, name, spec.shape, spec.dtype))
    elif isinstance(model, OpModel):
        aux = [(k, model.aux[k]) for k in model.op.model_params if k in model.aux]
        sources = list(model.inputs) + [m for _, ms in aux for m in ms]
        inputs = [_lower(g, memo, m, name) for m in sources]
        apply = Apply(
            model.op.name, model.resolved[name], model.base is not None, name, model.tensors[name].shape, model.span,
            tuple((k, len(ms)) for k, ms in aux), seed_tensor=name if model.op.random else None,
            offset=merge_offset(model, name),
        )
        n = g.add(apply, inputs)
    elif isinstance(model, WithModel):
        n = _lower(g, memo, model.source_of(name), name)
    elif isinstance(model, HeadView):  # a tied model's head is its embedding
        n = _lower(g, memo, model.value, model.source_name(name))
    elif isinstance(model, LoraModel):
        n = lower_lora(g, memo, model, name, _lower)
    elif isinstance(model, StackModel):
        source, source_name = model.sources[name]
        n = _lower(g, memo, source, source_name)
    elif isinstance(model, MoeModel):  # a router from the gate's cache folder (mgc.gates), or a copied tensor
        if name in model.routers:
            spec = model.tensors[name]
            n = g.add(Load(model.gate.cache_path, model.routers[name], spec.shape, spec.dtype))
        else:
            source, source_name = model.sources[name]
            n = _lower(g, memo, source, source_name)
    else:  # pragma: no cover
        raise TypeError(f"cannot lower {model!r}")
    memo[key] = n
    return n
