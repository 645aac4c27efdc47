"""A call of a stdlib operator, checked: its arity, base and model-valued parameters, that its input models
hold the same tensors in the same shapes, and its parameters bound and resolved per tensor."""
from __future__ import annotations

from typing import TYPE_CHECKING

from mgc.core.errors import CheckpointError, RecipeNameError, RecipeTypeError, Span
from mgc.grammar import ast

from .heads import untie_inputs, vocab_rows_differ
from .params import bind, resolve_all, unmatched_selectors
from .selectors import bind_layers, selector_hint
from .values import CheckpointModel, FisherModel, ListV, ModelValue, OpModel, TensorSpec, Value, kind_of

if TYPE_CHECKING:
    from .interpreter import Checker


def apply_operator(checker: Checker, op, e: ast.Call, env, stack) -> OpModel:
    models = tuple(checker.model_of(a, env, stack, f"argument {i + 1} of {op.name}()") for i, a in enumerate(e.args))
    spans = [a.span for a in e.args]
    n = len(models)
    if n < op.min_models or (op.max_models is not None and n > op.max_models):
        raise RecipeTypeError(f"{op.name}() takes {op.arity_text()}, got {n}", e.span)
    base = None
    kwargs: dict[str, tuple[Value, Span]] = {}
    aux: dict[str, tuple[ModelValue, ...]] = {}
    aux_spans: list[Span] = []
    for k in e.kwargs:
        if k.name == "base":
            if op.base == "none":
                raise RecipeNameError(f"{op.name}() takes no base model", k.span, "remove `base = ...`")
            base = checker.model_of(k.value, env, stack, "base")
            spans.insert(0, k.value.span)
        elif k.name in op.model_params:
            aux[k.name] = _models_per_input(checker, op, k, n, env, stack)
            aux_spans += [k.value.span] * n
        else:
            value = checker.eval(k.value, env, stack)
            if isinstance(value, ModelValue):
                raise RecipeTypeError(
                    f"'{k.name}' cannot be a model", k.value.span,
                    "models are positional arguments" + (", or `base = ...`" if op.base != "none" else ""),
                )
            kwargs[k.name] = (value, k.span)
    if op.base == "required" and base is None:
        raise RecipeTypeError(f"{op.name}() needs a base model", e.span, f"add `base = <model>` to {op.name}(...)")
    for name in op.required_model_params:
        if name not in aux:
            raise RecipeTypeError(
                f"{op.name}() needs '{name}': one model per input model", e.span,
                f"add `{name} = [{', '.join(f'{name}{i + 1}' for i in range(n))}]` to {op.name}(...)",
            )
    params = bind(op, kwargs, e.span, n, extra_names=op.model_params + (("base",) if op.base != "none" else ()))
    models, base, aux = untie_inputs(models, base, aux)  # a tied model's head is its embedding, where others store one
    inputs = ((base,) if base is not None else ()) + models
    reference = inputs[0]
    tensors = dict(reference.tensors)
    aux_models = tuple(m for name in op.model_params for m in aux.get(name, ()))
    for m, span in zip(inputs[1:] + aux_models, spans[1:] + aux_spans):
        for name, spec in tensors.items():
            other = m.tensors.get(name)
            if other is None:
                raise CheckpointError(
                    f"{op.name}(): tensor '{name}' is missing from {_describe(m)}", span,
                    f"the inputs of {op.name}() must hold the same tensors",
                )
            same_shape(name, spec, other, span)
        extra = [name for name in m.tensors if name not in tensors]
        if extra:
            raise CheckpointError(
                f"{op.name}(): tensor '{extra[0]}' is missing from {_describe(reference)}", spans[0],
                f"the inputs of {op.name}() must hold the same tensors"
                + (f"; {len(extra)} are missing in all" if len(extra) > 1 else ""),
            )
    params = {name: bind_layers(v, reference.num_layers) for name, v in params.items()}
    kwargs = {name: (bind_layers(v, reference.num_layers), span) for name, (v, span) in kwargs.items()}
    value_spans = {}
    for k in e.kwargs:
        if k.name != "base":
            value_spans[k.name] = k.value.span
    for name, (value, _) in kwargs.items():
        for selector in unmatched_selectors(value, tensors, reference.layers):
            raise RecipeNameError(
                f"selector '{selector}' in '{name}' matches no tensor", selector.span, selector_hint(selector, tensors)
            )
    resolved = resolve_all(op, params, value_spans, e.span, n, tensors, reference.layers)
    depth = 1 + max(m.depth for m in inputs + aux_models)
    return checker.deep_enough(OpModel(op, models, base, params, resolved, e.span, tensors, reference.layers, depth, aux))


def _models_per_input(checker: Checker, op, k: ast.Kwarg, n: int, env, stack) -> tuple[ModelValue, ...]:
    """A model-valued parameter such as `fisher = [fa, fb]`: one model per input model."""
    value = checker.eval(k.value, env, stack)
    items = value.items if isinstance(value, ListV) else (value,)
    if len(items) != n:
        raise RecipeTypeError(
            f"'{k.name}' has {len(items)} model{'s' if len(items) != 1 else ''} for {n} input model{'s' if n != 1 else ''}",
            k.value.span, f"give one {k.name} model per input model, in the same order",
        )
    for item, node in zip(items, k.value.items if isinstance(k.value, ast.List) else (k.value,)):
        if not isinstance(item, ModelValue):
            raise RecipeTypeError(f"'{k.name}' takes models, not {kind_of(item)}", node.span)
    return tuple(items)


def same_shape(name: str, a: TensorSpec, b: TensorSpec, span: Span) -> None:
    """Tensor `name` of a model merged or swapped in (b) agrees with the first model's (a)."""
    if a.shape != b.shape and not vocab_rows_differ(name, a, b):  # vocabularies are aligned by the save
        raise RecipeTypeError(f"tensor '{name}' has shape {list(b.shape)} here but {list(a.shape)} in the first model", span)
    if a.dtype.is_floating_point != b.dtype.is_floating_point:
        raise RecipeTypeError(f"tensor '{name}' is {b.dtype} here but {a.dtype} in the first model", span)


def _describe(m: ModelValue) -> str:
    if isinstance(m, CheckpointModel):
        return f"checkpoint {getattr(m.checkpoint, 'label', m.checkpoint.path)}"
    if isinstance(m, FisherModel):
        return f"the Fisher of checkpoint {m.model.checkpoint.path}"
    return "this model"
