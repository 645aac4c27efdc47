"""Lowering: checked symbolic models -> the tensor graph, one save node per output tensor.

Each (model value, tensor) pair is lowered once, so a variable used twice is shared;
equal computations written twice stay separate here and are merged by the CSE pass.
"""
from __future__ import annotations

from .check import Program
from .ir import Apply, Graph, Load, Save
from .layers import tensor_order
from .values import CheckpointModel, FisherModel, ModelValue, OpModel, StackModel, WithModel


def lower(program: Program) -> Graph:
    g = Graph()
    memo: dict[tuple[int, str], int] = {}
    for save in program.saves:
        for name in sorted(save.model.tensors, key=tensor_order):
            spec = save.model.tensors[name]
            src = _lower(g, memo, save.model, name)
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
        )
        n = g.add(apply, inputs)
    elif isinstance(model, WithModel):
        n = _lower(g, memo, model.source_of(name), name)
    elif isinstance(model, StackModel):
        source, source_name = model.sources[name]
        n = _lower(g, memo, source, source_name)
    else:  # pragma: no cover
        raise TypeError(f"cannot lower {model!r}")
    memo[key] = n
    return n
