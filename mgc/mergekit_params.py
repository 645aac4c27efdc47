"""mergekit's parameters as the arguments of one mgc operator call, at every level (a source's own, the
slice's, the top level's, highest first): a filter list becomes a table (falling through to the next level
where it has no default), a gradient `ramp(...)`, or in a one-layer slice the gradient's last point."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from mgc.mergekit_models import Importer
from mgc.mergekit_yaml import Y, mapping, refuse, string

# mergekit's parameter names that mgc spells differently
RENAMED = {"weight": "weights"}
# mgc's value of a per-model parameter where no setting reaches a model
PER_MODEL_DEFAULTS = {"weights": 1, "density": 1, "gamma": 0.01, "epsilon": 0.15}
# methods whose base mergekit treats as one more input (BasePolicy.IGNORED)
BASE_IS_INPUT = {"linear", "karcher", "passthrough", "fisher_merge"}


def num(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def yaml_scalar(x: Any) -> str:
    return ("true" if x else "false") if isinstance(x, bool) else str(x)


def _scalar(y: Y, name: str) -> Any:
    v = y.value
    if isinstance(v, str):
        try:
            v = float(v)  # mergekit reads "1e-3" as a number for a numeric parameter
        except ValueError:
            refuse(y, f"'{name}' = {v!r}: mgc's parameters take numbers and booleans, not strings")
    if isinstance(v, float) and not math.isfinite(v):
        refuse(y, f"'{name}' = {v}: not a finite number")
    if isinstance(v, (bool, int, float)):
        return v
    refuse(y, f"'{name}' cannot be {type(v).__name__}")


@dataclass
class Setting:
    """A mergekit parameter setting as mgc text: a scalar, a gradient or a table of filters."""

    text: str
    complete: bool  # whether it gives a value for every tensor (a filter list without a default does not)


def _setting(y: Y, name: str, one_layer: bool) -> Setting:
    v = y.value
    if isinstance(v, list) and v and all(not isinstance(i.value, (dict, list)) for i in v):
        points = [_scalar(i, name) for i in v]
        if any(isinstance(p, bool) for p in points):
            refuse(y, f"'{name}' is a list of booleans: mgc's gradients hold numbers only")
        if len(points) == 1:
            return Setting(num(points[0]), True)
        if one_layer:  # mergekit reads t = 1 in a one-layer slice, and t = 0 outside the layers
            return Setting(f"{{ layers[0:1]: {num(points[-1])}, _: {num(points[0])} }}", True)
        return Setting(f"ramp({', '.join(num(p) for p in points)})", True)
    if isinstance(v, dict):
        v = [y]
    if isinstance(v, list) and v:
        entries, complete = [], False
        for cond in v:
            c = mapping(cond, f"an entry of '{name}'")
            for k in c:
                if k not in ("filter", "value"):
                    refuse(c[k], f"unknown key '{k}' in a filtered setting of '{name}'", "mergekit's keys are filter and value", key=True)
            if "value" not in c:
                refuse(cond, f"a filtered setting of '{name}' has no value")
            inner = _setting(c["value"], name, one_layer)
            f = c.get("filter")
            if f is None or f.value is None or f.value == "*":
                entries.append(f"_: {inner.text}")
                complete = True
                break
            pattern = string(f, "a filter")
            if any(ch in pattern for ch in "*?["):
                refuse(f, f"filter {pattern!r} holds a wildcard: mergekit matches it as a plain substring, mgc as a glob",
                        "write the filter without *, ? or [")
            entries.append(f"{_key(pattern)}: {inner.text}")
        return Setting("{ " + ", ".join(entries) + " }", complete)
    if isinstance(v, list):
        refuse(y, f"'{name}' is an empty list")
    return Setting(num(_scalar(y, name)), True)


def _key(pattern: str) -> str:
    return pattern if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", pattern) and pattern not in ("_", "layers") else json.dumps(pattern)


def _chain(settings: list[Setting], default: Optional[str]) -> Optional[str]:
    """The settings of one parameter from highest to lowest precedence, as one mgc value: a filter list
    without a default falls through to the next level, as mergekit's resolution does."""
    out: Optional[str] = None
    for s in reversed(settings):
        out = s.text if out is None or s.complete else s.text[:-2] + f", _: {out} }}"
    if out is not None and default is not None and not any(s.complete for s in settings):
        out = out[:-2] + f", _: {default} }}"
    return out



def read_params(imp: Importer, y: Optional[Y], op, method: str) -> dict[str, tuple[str, Y]]:
    """mergekit name -> (mgc name, node) of one `parameters:` block."""
    if y is None or y.value is None:
        return {}
    out = {}
    surface = {(f.alias or k) for k, f in op.params.model_fields.items()}
    for k, v in mapping(y, "parameters").items():
        if k == "int8_mask":
            if f"int8_mask: {yaml_scalar(v.value)}" not in imp.notes:
                imp.notes.append(f"int8_mask: {yaml_scalar(v.value)}")
            continue  # changes only the dtype of mergekit's masks
        name = RENAMED.get(k, k)
        if name not in surface or name == "fisher":
            refuse(v, f"mergekit's {method} parameter '{k}' has no counterpart in mgc's {method}",
                    f"mgc's {method} takes: {', '.join(sorted(surface)) or 'no parameters'}", key=True)
        out[k] = (name, v)
    return out


def merge_call(imp: Importer, op, method: str, method_y: Y, base: Optional[str], sources, levels, one_layer: bool, at: Y) -> str:
    """One operator call over `sources` [(model var, parameters, layer range or None)], with the shared
    `levels` of parameters (slice, then global) below each source's own."""
    def arg(m, rng):
        return m if rng is None else f"stack({m}.layers[{rng[0]}:{rng[1]}])"

    base_arg, inputs = None, []
    base_in_sources = [s for s in sources if s[0] == base]
    if base is None and op.base == "required":
        refuse(method_y, f"mergekit's {method} needs a base_model")
    if base is not None and op.base != "none" or method == "slerp":
        if base is None:
            refuse(method_y, f"mergekit's {method} needs a base_model")
        if base_in_sources:
            base_arg = arg(base, base_in_sources[0][2])
        elif sources[0][2] is None:
            base_arg = base
        else:
            refuse(at, f"the slice's sources do not include the base model of {method}",
                    "add the base model's layer range to the slice's sources")
        inputs = [s for s in sources if s[0] != base]
    else:
        inputs = list(sources)
        if base is not None and not base_in_sources and sources[0][2] is None and method in BASE_IS_INPUT:
            inputs.append((base, {}, None))  # mergekit adds the base as one more input
    if not inputs:
        refuse(at, f"{method} has no model to merge besides the base")
    args = [arg(m, rng) for m, _, rng in inputs]
    if method == "slerp":
        if len(inputs) != 1:
            refuse(at, f"slerp merges the base with exactly one other model, got {len(inputs)} others")
        args = [base_arg] + args
        base_arg = None
    kwargs = []
    if base_arg is not None:
        kwargs.append(f"base = {base_arg}")
    per_model = set(op.per_model)
    names = []
    for level in [s[1] for s in inputs] + levels:
        for k, (name, _) in level.items():
            if (k, name) not in names:
                names.append((k, name))
    for k, name in names:
        field_name = next(f for f, fi in op.params.model_fields.items() if (fi.alias or f) == name)
        if field_name in per_model:
            shared = [_setting(lv[k][1], k, one_layer) for lv in levels if k in lv]
            values = []
            for _, own, _ in inputs:
                chain = ([_setting(own[k][1], k, one_layer)] if k in own else []) + shared
                values.append(_chain(chain, num(PER_MODEL_DEFAULTS.get(name, 1))))
            if all(v == values[0] for v in values) and values[0] is not None:
                kwargs.append(f"{name} = {values[0]}")
            else:
                values = [v if v is not None else num(PER_MODEL_DEFAULTS.get(name, 1)) for v in values]
                kwargs.append(f"{name} = [{', '.join(values)}]")
        else:
            for _, own, _ in inputs:
                if k in own:
                    refuse(own[k][1], f"'{k}' is a parameter of the whole merge in mergekit, not of one model",
                            "move it to the slice's or the top-level parameters", key=True)
            chain = [_setting(lv[k][1], k, one_layer) for lv in levels if k in lv]
            value = _chain(chain, None)
            if value is not None:
                kwargs.append(f"{name} = {value}")
    call = f"{method}({', '.join(args + kwargs)})"
    if len(call) <= 88:
        return call
    return f"{method}(\n" + "".join(f"    {a},\n" for a in args + kwargs) + ")"
