"""Operator parameters: binding recipe values to a schema, and resolving them per tensor.

Every parameter accepts a number (or boolean, or string), a list of numbers read as a
gradient across layers, or a selector table whose first matching entry applies.
Per-model parameters (`weights`, `density`, ...) take a list with one such value per model,
or one value for all models.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import ValidationError

from mgc.stdlib.operator import Operator

from mgc.core.errors import RecipeNameError, RecipeTypeError, Span, did_you_mean
from .layers import LayerMap, Unplaced, interpolate, numbered_prefix
from .values import Bool, ListV, Num, Str, TableV, Value, kind_of

MISSING = object()


def surface_names(op: Operator) -> dict[str, str]:
    """The name a user writes for each schema field (its alias where it has one) -> field name."""
    return {(f.alias or name): name for name, f in op.params.model_fields.items()}


def check_value(value: Value, param: str, per_model: bool, n_models: int) -> None:
    """Reject values of the wrong shape before any tensor is looked at."""
    if isinstance(value, TableV):
        for _, entry in value.entries:
            check_value(entry, param, per_model, n_models)
    elif per_model and isinstance(value, ListV) and not value.gradient:
        if len(value.items) != n_models:
            numbers = [i.value for i in value.items if isinstance(i, Num)]
            example = ", ".join(f"{x:g}" for x in numbers) if len(numbers) == len(value.items) >= 2 else "1, 0.7, 0.1"
            raise RecipeTypeError(
                f"'{param}' has {len(value.items)} value{'s' if len(value.items) != 1 else ''} for {n_models} model{'s' if n_models != 1 else ''}",
                value.span,
                f"give one value per model, in the order of the models, or a single value for all; "
                f"for a gradient across layers, write ramp({example})",
            )
        for item in value.items:
            check_value(item, param, False, n_models)
    elif isinstance(value, ListV):
        if not value.items:
            raise RecipeTypeError(f"'{param}' is an empty list", value.span, "a list is a gradient across layers: give at least one number")
        for item in value.items:
            if not isinstance(item, Num):
                raise RecipeTypeError(
                    f"'{param}' is a list holding {kind_of(item)}", item.span,
                    "a list is a gradient across layers and holds numbers only",
                )
    elif not isinstance(value, (Num, Bool, Str)):
        raise RecipeTypeError(f"'{param}' cannot be {kind_of(value)}", value.span)


def resolve(value: Value, tensor: str, layers: LayerMap, per_model: bool, n_models: int, param: str = "") -> Any:
    """The plain value a parameter takes for one tensor; MISSING if no table entry matches."""
    if isinstance(value, TableV):
        entry = value.lookup(tensor, layers)
        return MISSING if entry is None else resolve(entry, tensor, layers, per_model, n_models, param)
    if per_model:
        items = value.items if isinstance(value, ListV) and not value.gradient else (value,) * n_models
        out = [resolve(item, tensor, layers, False, n_models, param) for item in items]
        return MISSING if any(v is MISSING for v in out) else out
    if isinstance(value, ListV):
        return interpolate([item.value for item in value.items], _position(value, tensor, layers, param))
    return value.value


def _position(gradient: ListV, tensor: str, layers: LayerMap, param: str) -> float:
    if len(gradient.items) == 1:
        return 0.0
    place = layers.place(tensor)
    if isinstance(place, Unplaced):
        raise RecipeTypeError(
            f"the gradient of '{param}' cannot be applied to tensor '{tensor}': mgc cannot place it in a layer stack",
            gradient.span,
            f"give these tensors a value of their own in a table before the gradient, e.g. "
            f"{param} = {{ \"{numbered_prefix(tensor)}\": 0.5, _: [...] }}",
        )
    return place.position()


def unmatched_selectors(value: Value, tensors, layers: LayerMap) -> list:
    """Selectors in a table (at any depth) that match none of the tensors."""
    out = []
    if isinstance(value, TableV):
        for selector, entry in value.entries:
            if selector.kind != "default" and not any(selector.matches(n, layers) for n in tensors):
                out.append(selector)
            out.extend(unmatched_selectors(entry, tensors, layers))
    elif isinstance(value, ListV):
        for item in value.items:
            out.extend(unmatched_selectors(item, tensors, layers))
    return out


def resolve_all(
    op: Operator, params: dict[str, Value], spans: dict[str, Span], call_span: Span, n_models: int,
    tensors, layers: LayerMap,
) -> dict[str, Any]:
    """Validate the parameters for every output tensor; return tensor name -> params instance.

    Each distinct set of resolved values is validated once through the operator's pydantic schema.
    """
    by_key: dict[tuple, Any] = {}
    out: dict[str, Any] = {}
    per_model = set(op.per_model)
    for tensor in tensors:
        values = {}
        for name, value in params.items():
            v = resolve(value, tensor, layers, name in per_model, n_models, _surface(op, name))
            if v is MISSING:
                if op.params.model_fields[name].is_required():
                    raise RecipeTypeError(
                        f"{op.name}(): no entry of '{_surface(op, name)}' matches tensor '{tensor}'",
                        value.span, "add a default entry `_: value` to the table",
                    )
                continue
            values[name] = v
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))
        if key not in by_key:
            varying = {name for name, value in params.items() if _varies(value, name in per_model)}
            by_key[key] = _validate(op, values, spans, call_span, tensor, varying)
        out[tensor] = by_key[key]
    return out


def _surface(op: Operator, field: str) -> str:
    return op.params.model_fields[field].alias or field


def _varies(value: Value, per_model: bool = False) -> bool:
    """Whether a parameter can take different values for different tensors."""
    if isinstance(value, TableV):
        return True
    if isinstance(value, ListV):
        if per_model and not value.gradient:
            return any(_varies(v) for v in value.items)
        return len(value.items) > 1
    return False


def _validate(op: Operator, values: dict[str, Any], spans: dict[str, Span], call_span: Span, tensor: str, varying: set):
    try:
        return op.params.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"][0] if err["loc"] else None
        field = loc if loc in op.params.model_fields else surface_names(op).get(loc) if isinstance(loc, str) else None
        if field is None:  # a check across fields: blame the first field its message names
            words = set(re.findall(r"[A-Za-z_]+", err["msg"]))
            field = next((f for name, f in surface_names(op).items() if name in words and f in values), None)
        if err["type"] == "missing" and field:
            raise RecipeTypeError(f"{op.name}() needs the parameter '{_surface(op, field)}'", call_span, _doc_hint(op, field)) from None
        shown = f"{_surface(op, field)}" if field else ""
        got = f" = {_show(values[field])}" if field in values else ""
        where = f" (for tensor '{tensor}')" if varying & ({field} if field else set(values)) else ""
        message = err["msg"].removeprefix("Value error, ")
        span = spans.get(_surface(op, field), call_span) if field else call_span
        prefix = f"{op.name}(): {shown}{got}{where}: " if field else f"{op.name}(){where}: "
        raise RecipeTypeError(prefix + message, span, _doc_hint(op, field)) from None


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def _doc_hint(op: Operator, field: Optional[str]) -> Optional[str]:
    if not field or field not in op.params.model_fields:
        return None
    info = op.params.model_fields[field]
    return f"{_surface(op, field)}: {info.description}" if info.description else None


def bind(
    op: Operator, kwargs: dict[str, tuple[Value, Span]], call_span: Span, n_models: int, extra_names=(),
) -> dict[str, Value]:
    """Map keyword arguments to schema fields, checking names and value shapes."""
    names = surface_names(op)
    bound: dict[str, Value] = {}
    for key, (value, span) in kwargs.items():
        field = names.get(key)
        if field is None:
            known = sorted(names) + list(extra_names)
            hint = did_you_mean(key, known) or (f"{op.name}() takes {', '.join(known) or 'no parameters'}")
            raise RecipeNameError(f"{op.name}() got an unknown parameter '{key}'", span, hint)
        check_value(value, key, field in op.per_model, n_models)
        bound[field] = value
    for field, info in op.params.model_fields.items():
        if info.is_required() and field not in bound:
            raise RecipeTypeError(f"{op.name}() needs the parameter '{_surface(op, field)}'", call_span, _doc_hint(op, field))
    return bound
