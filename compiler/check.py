"""The checker: evaluates a recipe's AST into symbolic models and the outputs to write.

Everything short of reading tensor data is checked here: names, arity, parameter
types and ranges (through each operator's pydantic schema, per tensor), that every
checkpoint exists and that the tensors merged together agree in name and shape
(from safetensors headers). Errors are collected across statements and raised together.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mgc.core import hub
from mgc.core.checkpoint import Checkpoint, resolve_checkpoint_path
from mgc.core.errors import (
    CheckpointError, MgcError, MgcErrors, MgcWarning, OutputError, RecipeNameError, RecipeTypeError, Span, did_you_mean, end_of,
)
from mgc.grammar import ast
from mgc.stdlib import OPERATORS

from . import fisher_cache
from .layers import layer_map
from .params import bind, resolve_all, unmatched_selectors
from .values import (
    Bool, CheckpointModel, FisherModel, Function, LayerRange, ListV, ModelValue, Num, OpModel, Selector, StackModel,
    Str, TableV, TensorSpec, Value, WithModel, kind_of, stack_sources,
)

BUILTINS = ("model", "ramp", "stack", "fisher")
FISHER_PARAMS = ("data", "samples", "max_length")
CONSTANTS = {"true": True, "false": False}
SAVE_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "f16": torch.float16,
    "float16": torch.float16, "fp32": torch.float32, "f32": torch.float32, "float32": torch.float32,
}
SAVE_OPTIONS = ("dtype", "shard", "tokenizer")
DEFAULT_SHARD = 5 * 10**9
MAX_MODEL_DEPTH = 200  # operations nested in one value; deeper ones would exhaust Python's stack when lowered


@dataclass
class SaveSpec:
    model: ModelValue
    path: Path
    dtype: torch.dtype  # of every floating tensor; non-floating ones keep their own
    shard_bytes: int
    tokenizer: Optional[CheckpointModel]
    span: Span
    config: dict = field(default_factory=dict)  # config.json of the output, derived from its tensors' sources


@dataclass
class Program:
    """A checked recipe: the outputs to write and every checkpoint it opened."""

    saves: list[SaveSpec]
    checkpoints: dict[Path, object] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    # fisher(...) values by cache folder: mgc.fisher computes the missing ones before a run
    fishers: dict[Path, FisherModel] = field(default_factory=dict)
    warnings: list[MgcError] = field(default_factory=list)  # reported by check, plan and run; nothing stops


class _Poisoned(Exception):
    """A name whose definition already failed: its uses report nothing more."""


class Checker:
    def __init__(self, recipe: ast.Recipe, allow_pickle: bool = False, base_dir: Optional[Path] = None):
        self.recipe = recipe
        self.allow_pickle = allow_pickle
        self.base_dir = base_dir or Path.cwd()
        self.globals: dict[str, Value] = {}
        self.poisoned: set[str] = set()
        self.defs: dict[str, ast.Def] = {}
        self.checkpoints: dict[Path, object] = {}
        self.fishers: dict[Path, FisherModel] = {}
        self.layer_maps: dict[Path, object] = {}
        self.warnings: list[MgcError] = []
        self.errors: list[MgcError] = []
        self.reads: dict[int, set[int]] = {}  # statement -> the assignments it read
        self.current_reads: set[int] = set()
        self.bound_at: dict[str, int] = {}

    def run(self) -> Program:
        for stmt in self.recipe.statements:
            if isinstance(stmt, ast.Def):
                self._define(stmt)
        saves: list[SaveSpec] = []
        for index, stmt in enumerate(self.recipe.statements):
            self.reads[index] = self.current_reads = set()
            try:
                if isinstance(stmt, ast.Assign):
                    self.poisoned.discard(stmt.name)
                    self.globals[stmt.name] = self.eval(stmt.value, {}, ())
                    self.bound_at[stmt.name] = index
                elif isinstance(stmt, ast.Save):
                    saves.append(self._save(stmt, saves))
            except _Poisoned:
                if isinstance(stmt, ast.Assign):
                    self.poisoned.add(stmt.name)
            except MgcError as e:
                self.errors.append(e)
                if isinstance(stmt, ast.Assign):
                    self.poisoned.add(stmt.name)
        if not saves and not self.errors:
            self.errors.append(RecipeNameError(
                "the recipe saves nothing", end_of(self.recipe.source), 'add a line `save <model> to "<folder>"`'
            ))
        if self.errors:
            raise self.errors[0] if len(self.errors) == 1 else MgcErrors(self.errors)
        return Program(saves, self.checkpoints, self._unused(), self.fishers, self.warnings)

    def _unused(self) -> list[str]:
        """Assigned names that no save needs, directly or through other assignments."""
        needed: set[int] = set()
        todo = [i for i, s in enumerate(self.recipe.statements) if isinstance(s, ast.Save)]
        while todo:
            i = todo.pop()
            for j in self.reads.get(i, ()):
                if j not in needed:
                    needed.add(j)
                    todo.append(j)
        statements = self.recipe.statements
        names = [s.name for i, s in enumerate(statements) if isinstance(s, ast.Assign) and i not in needed]
        return list(dict.fromkeys(names))

    def _define(self, stmt: ast.Def) -> None:
        if stmt.name in self.defs:
            self.errors.append(RecipeNameError(f"'{stmt.name}' is defined twice", stmt.name_span))
        elif stmt.name in OPERATORS or stmt.name in BUILTINS:
            self.errors.append(RecipeNameError(f"'{stmt.name}' is a built-in and cannot be redefined", stmt.name_span))
        else:
            self.defs[stmt.name] = stmt

    # --- expressions -------------------------------------------------------------------------

    def eval(self, e: ast.Expr, env: dict[str, Value], stack: tuple[str, ...]) -> Value:
        if isinstance(e, ast.Number):
            return Num(e.value, e.span)
        if isinstance(e, ast.String):
            return Str(e.value, e.span)
        if isinstance(e, ast.Name):
            return self._lookup(e, env)
        if isinstance(e, ast.List):
            return ListV(tuple(self.eval(i, env, stack) for i in e.items), e.span)
        if isinstance(e, ast.Table):
            return self._table(e, env, stack)
        if isinstance(e, ast.Call):
            return self._call(e, env, stack)
        if isinstance(e, ast.LayerSlice):
            return self._layer_slice(e, env, stack)
        if isinstance(e, ast.With):
            return self._with(e, env, stack)
        raise TypeError(f"unknown expression {e!r}")  # pragma: no cover

    def _lookup(self, e: ast.Name, env: dict[str, Value]) -> Value:
        if e.id in env:
            return env[e.id]
        if e.id in self.poisoned:
            raise _Poisoned(e.id)
        if e.id in self.globals:
            self.current_reads.add(self.bound_at[e.id])
            return _respan(self.globals[e.id], e.span)
        if e.id in CONSTANTS:
            return Bool(CONSTANTS[e.id], e.span)
        if e.id in self.defs:
            return Function(self.defs[e.id])
        if e.id in OPERATORS or e.id in BUILTINS:
            raise RecipeTypeError(f"'{e.id}' is an operator: call it, as {e.id}(...)", e.span)
        known = list(env) + list(self.globals) + list(self.defs)
        raise RecipeNameError(f"unknown name '{e.id}'", e.span, did_you_mean(e.id, known) or _defined_later(self.recipe, e))

    def _table(self, e: ast.Table, env, stack) -> TableV:
        entries = []
        for entry in e.entries:
            entries.append((_selector(entry.key), self.eval(entry.value, env, stack)))
        return TableV(tuple(entries), e.span)

    def _model(self, e: ast.Expr, env, stack, what: str) -> ModelValue:
        value = self.eval(e, env, stack)
        if not isinstance(value, ModelValue):
            raise RecipeTypeError(f"{what} must be a model, not {kind_of(value)}", e.span)
        return value

    def _call(self, e: ast.Call, env, stack) -> Value:
        if e.func in env and isinstance(env[e.func], Function):
            return self._call_def(env[e.func].node, e, env, stack)
        if e.func in self.defs:
            return self._call_def(self.defs[e.func], e, env, stack)
        if e.func == "model":
            return self._open_model(e, env, stack)
        if e.func == "ramp":
            return self._ramp(e, env, stack)
        if e.func == "stack":
            return self._stack(e, env, stack)
        if e.func == "fisher":
            return self._fisher(e, env, stack)
        op = OPERATORS.get(e.func)
        if op is None:
            hint = did_you_mean(e.func, list(OPERATORS) + list(BUILTINS) + list(self.defs))
            raise RecipeNameError(f"unknown operator '{e.func}'", e.func_span, hint or "`mgc ops` lists the operators")
        return self._apply(op, e, env, stack)

    def _call_def(self, d: ast.Def, e: ast.Call, env, stack) -> Value:
        if d.name in stack:
            cycle = " -> ".join(stack[stack.index(d.name):] + (d.name,))
            raise RecipeNameError(f"cycle through def: {cycle}", e.func_span, "a def cannot call itself, directly or through others")
        # The parser bounds the nesting of each expression, but a def's body is evaluated inside its caller's,
        # so nesting adds up along a chain of def calls (the checker and lowering recurse once per level).
        levels = sum(ast.nesting(node.body) for node in [self.defs[n] for n in stack if n in self.defs] + [d])
        if levels > ast.MAX_NESTING:
            chain = stack + (d.name,)
            shown = " -> ".join(chain if len(chain) <= 6 else chain[:3] + ("...",) + chain[-2:])
            raise RecipeNameError(
                f"def calls nested too deeply: {shown} ({len(chain)} calls)", e.func_span,
                f"the bodies of defs called within defs may nest {ast.MAX_NESTING} levels in all",
            )
        if e.kwargs:
            by_name = {k.name: k for k in e.kwargs}
            unknown = [k for k in by_name if k not in d.params]
            if unknown:
                k = by_name[unknown[0]]
                raise RecipeNameError(f"{d.name}() has no parameter '{k.name}'", k.span,
                                      did_you_mean(k.name, d.params) or f"def {d.name}({', '.join(d.params)})")
        given = len(e.args) + len(e.kwargs)
        if given != len(d.params):
            raise RecipeTypeError(
                f"{d.name}() takes {len(d.params)} argument{'s' if len(d.params) != 1 else ''}, got {given}",
                e.span, f"def {d.name}({', '.join(d.params)})",
            )
        local: dict[str, Value] = {}
        for name, arg in zip(d.params, e.args):
            local[name] = self.eval(arg, env, stack)
        for k in e.kwargs:
            if k.name in local:
                raise RecipeTypeError(f"{d.name}() got '{k.name}' twice", k.span)
            local[k.name] = self.eval(k.value, env, stack)
        try:
            return self.eval(d.body, local, stack + (d.name,))
        except RecipeNameError as err:
            if err.message.startswith("cycle through def") and stack == ():
                raise RecipeNameError(err.message, e.func_span, err.hint) from None
            raise

    def _open_model(self, e: ast.Call, env, stack) -> ModelValue:
        if len(e.args) != 1 or e.kwargs:
            raise RecipeTypeError("model() takes one argument, the checkpoint folder", e.span)
        arg = self.eval(e.args[0], env, stack)
        if not isinstance(arg, Str):
            raise RecipeTypeError(f"model() takes a path string, not {kind_of(arg)}", e.args[0].span)

        # only an explicit hf://org/name is fetched (mgc/core/hub.py); anything else is a local path
        if hub.looks_like_hub_id(arg.value):
            path = resolve_checkpoint_path(str(hub.fetch(arg.value, arg.span)), self.base_dir, arg.span)
        else:
            path = resolve_checkpoint_path(arg.value, self.base_dir, arg.span)
            if not os.path.lexists(path):
                raise hub.not_found(arg.value, self.base_dir, arg.span)
        ckpt = self.checkpoints.get(path)
        if ckpt is None:

            try:
                ckpt = Checkpoint.open(path, allow_pickle=self.allow_pickle, span=arg.span)
            except CheckpointError as err:
                if err.span is None:
                    err.span = arg.span
                raise
            self.checkpoints[path] = ckpt
        tensors = {n: TensorSpec(i.shape, i.dtype) for n, i in ckpt.tensors.items()}
        if ckpt.path not in self.layer_maps:
            try:
                self.layer_maps[ckpt.path] = layer_map(ckpt.config, tensors, str(ckpt.path))
            except CheckpointError as err:
                raise CheckpointError(err.message, arg.span, err.hint) from None
        return CheckpointModel(ckpt, e.span, tensors, self.layer_maps[ckpt.path])

    def _fisher(self, e: ast.Call, env, stack) -> FisherModel:
        """`fisher(m, data = "file.txt", samples = 64, max_length = 256)`: checked here, computed before the run."""
        
        usage = 'fisher(m, data = "file.txt", samples = 64, max_length = 256)'
        if len(e.args) != 1:
            raise RecipeTypeError(f"fisher() takes one model, got {len(e.args)} positional arguments", e.span, f"write {usage}")
        opts: dict[str, ast.Kwarg] = {}
        for k in e.kwargs:
            if k.name not in FISHER_PARAMS:
                raise RecipeNameError(
                    f"fisher() got an unknown parameter '{k.name}'", k.span,
                    did_you_mean(k.name, FISHER_PARAMS) or f"parameters: {', '.join(FISHER_PARAMS)}",
                )
            if k.name in opts:
                raise RecipeTypeError(f"fisher() got '{k.name}' twice", k.span)
            opts[k.name] = k
        model = self._model(e.args[0], env, stack, "the argument of fisher()")
        if not isinstance(model, CheckpointModel):
            raise RecipeTypeError(
                "fisher() needs a checkpoint model, not a merged or derived one", e.args[0].span,
                'the Fisher is estimated by running a checkpoint with transformers: pass a model("...") value, '
                "or save the merge first and load it with model(...)",
            )
        if "data" not in opts:
            raise RecipeTypeError("fisher() needs `data = \"file.txt\"`: the text it is estimated on", e.span, f"write {usage}")
        data = self.eval(opts["data"].value, env, stack)
        if not isinstance(data, Str):
            raise RecipeTypeError(f"fisher()'s data must be a path string, not {kind_of(data)}", opts["data"].value.span)
        samples = self._count_option(opts.get("samples"), fisher_cache.DEFAULT_SAMPLES, 1, env, stack)
        max_length = self._count_option(opts.get("max_length"), fisher_cache.DEFAULT_MAX_LENGTH, 2, env, stack)
        try:
            path = (self.base_dir / os.path.expanduser(data.value)).resolve()
            is_file, exists = path.is_file(), path.exists()
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot use '{data.value}' as fisher()'s data: {getattr(err, 'strerror', None) or err}",
                                  data.span) from None
        if not is_file:
            raise CheckpointError(
                f"no data file at '{data.value}'" if not exists else f"data '{data.value}' is not a file", data.span,
                "paths are relative to the working directory; fisher() reads a text file, documents separated by blank lines",
            )
        try:
            info = fisher_cache.inspect_data(path)
        except MgcError as err:
            raise CheckpointError(err.message, data.span, err.hint) from None
        ckpt = model.checkpoint
        if not ckpt.tokenizer_files():
            raise CheckpointError(
                f"{ckpt.path}: no tokenizer files, which fisher() needs to tokenize the data", e.args[0].span,
            )
        try:
            key = fisher_cache.fisher_key(ckpt.path, path, samples, max_length, data_sha256=info.sha256)
        except OSError as err:
            raise CheckpointError(f"{ckpt.path}: cannot read: {err.strerror or err}", e.args[0].span) from None
        cache = fisher_cache.cache_path(key)
        if not fisher_cache.is_cached(cache) and not fisher_cache.transformers_available():
            raise MgcError(
                "fisher() needs the transformers package to estimate a Fisher that is not cached yet", e.func_span,
                "pip install 'mgc[eval]' (or pip install transformers)",
            )
        tensors = {
            n: TensorSpec(s.shape, torch.float32 if s.dtype.is_floating_point else s.dtype) for n, s in model.tensors.items()
        }
        value = FisherModel(model, path, samples, max_length, key, cache, e.span, tensors, model.layers)
        self.fishers.setdefault(cache, value)
        return value

    def _count_option(self, k: Optional[ast.Kwarg], default: int, minimum: int, env, stack) -> int:
        if k is None:
            return default
        v = self.eval(k.value, env, stack)
        if not isinstance(v, Num) or not float(v.value).is_integer():
            raise RecipeTypeError(f"fisher()'s {k.name} must be a whole number, not {kind_of(v) if not isinstance(v, Num) else v.value}", k.value.span)
        if v.value < minimum:
            raise RecipeTypeError(f"fisher()'s {k.name} must be at least {minimum}, got {int(v.value)}", k.value.span)
        return int(v.value)

    def _ramp(self, e: ast.Call, env, stack) -> ListV:
        if len(e.args) != 2 or e.kwargs:
            raise RecipeTypeError("ramp() takes two numbers: the value at the first layer and at the last", e.span)
        items = tuple(self.eval(a, env, stack) for a in e.args)
        for item in items:
            if not isinstance(item, Num):
                raise RecipeTypeError(f"ramp() takes numbers, not {kind_of(item)}", item.span)
        return ListV(items, e.span)

    def _layer_slice(self, e: ast.LayerSlice, env, stack) -> LayerRange:
        model = self._model(e.value, env, stack, "the value sliced with .layers[...]")
        _require_primary_stack(model, e.span)
        start = 0 if e.start is None else e.start
        stop = model.num_layers if e.stop is None else e.stop
        if start < 0:
            start += model.num_layers
        if stop < 0:
            stop += model.num_layers
        if 0 <= start <= model.num_layers and 0 <= stop <= model.num_layers and start >= stop:
            raise RecipeTypeError(
                f"layers[{start}:{stop}] is empty", e.span, "a range a:b holds layers a to b - 1: write the smaller index first",
            )
        if not 0 <= start < stop <= model.num_layers:
            raise RecipeTypeError(
                f"layers[{start}:{stop}] is outside the model's {model.num_layers} layers", e.span,
                f"valid layer indices are 0 to {model.num_layers - 1}; the range excludes its end",
            )
        return LayerRange(model, start, stop, e.span)

    def _stack(self, e: ast.Call, env, stack) -> StackModel:
        if e.kwargs:
            raise RecipeNameError(f"stack() takes no parameters, got '{e.kwargs[0].name}'", e.kwargs[0].span)
        if not e.args:
            raise RecipeTypeError("stack() needs at least one layer range, as stack(a.layers[0:4], b.layers[4:8])", e.span)
        parts = []
        for arg in e.args:
            value = self.eval(arg, env, stack)
            if isinstance(value, ModelValue):
                _require_primary_stack(value, arg.span)
                value = LayerRange(value, 0, value.num_layers, arg.span)
            if not isinstance(value, LayerRange):
                raise RecipeTypeError(f"stack() takes layer ranges like m.layers[0:4], not {kind_of(value)}", arg.span)
            parts.append(value)
        prefix = parts[0].model.layers.primary.prefix
        for part in parts[1:]:
            if part.model.layers.primary.prefix != prefix:
                raise RecipeTypeError(
                    f"stack(): this part's layers are named '{part.model.layers.primary.prefix}N' but the first part's "
                    f"'{prefix}N'", part.span, "stack() joins layers of one architecture",
                )
        sources = stack_sources(tuple(parts))
        tensors = {}
        for name, (model, src) in sources.items():
            tensors[name] = model.tensors[src]
        _check_stack_shapes(parts)
        layers = parts[0].model.layers.with_primary_count(sum(p.stop - p.start for p in parts))
        depth = 1 + max(p.model.depth for p in parts)
        return self._deep_enough(StackModel(tuple(parts), e.span, tensors, layers, depth, sources))

    def _with(self, e: ast.With, env, stack) -> WithModel:
        base = self._model(e.value, env, stack, "the value before `with`")
        overrides = []
        for entry in e.table.entries:
            selector = _layer_bounds(_selector(entry.key), base.num_layers)
            model = self._model(entry.value, env, stack, f"the override for '{selector}'")
            matched = [n for n in base.tensors if selector.matches(n, base.layers)]
            if not matched:
                raise RecipeNameError(
                    f"selector '{selector}' matches no tensor of the model", entry.key.span, _selector_hint(selector, base.tensors)
                )
            for name in matched:
                if name not in model.tensors:
                    raise CheckpointError(f"the override for '{selector}' has no tensor '{name}'", entry.value.span)
                _same_shape(name, base.tensors[name], model.tensors[name], entry.value.span)
            overrides.append((selector, model))
        depth = 1 + max([base.depth] + [m.depth for _, m in overrides])
        return self._deep_enough(WithModel(base, tuple(overrides), e.span, dict(base.tensors), base.layers, depth))

    def _apply(self, op, e: ast.Call, env, stack) -> OpModel:
        models = tuple(self._model(a, env, stack, f"argument {i + 1} of {op.name}()") for i, a in enumerate(e.args))
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
                base = self._model(k.value, env, stack, "base")
                spans.insert(0, k.value.span)
            elif k.name in op.model_params:
                aux[k.name] = self._models_per_input(op, k, n, env, stack)
                aux_spans += [k.value.span] * n
            else:
                value = self.eval(k.value, env, stack)
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
                _same_shape(name, spec, other, span)
            extra = [name for name in m.tensors if name not in tensors]
            if extra:
                raise CheckpointError(
                    f"{op.name}(): tensor '{extra[0]}' is missing from {_describe(reference)}", spans[0],
                    f"the inputs of {op.name}() must hold the same tensors"
                    + (f"; {len(extra)} are missing in all" if len(extra) > 1 else ""),
                )
        params = {name: _bind_layers(v, reference.num_layers) for name, v in params.items()}
        kwargs = {name: (_bind_layers(v, reference.num_layers), span) for name, (v, span) in kwargs.items()}
        value_spans = {}
        for k in e.kwargs:
            if k.name != "base":
                value_spans[k.name] = k.value.span
        for name, (value, _) in kwargs.items():
            for selector in unmatched_selectors(value, tensors, reference.layers):
                raise RecipeNameError(
                    f"selector '{selector}' in '{name}' matches no tensor", selector.span, _selector_hint(selector, tensors)
                )
        resolved = resolve_all(op, params, value_spans, e.span, n, tensors, reference.layers)
        depth = 1 + max(m.depth for m in inputs + aux_models)
        return self._deep_enough(OpModel(op, models, base, params, resolved, e.span, tensors, reference.layers, depth, aux))

    def _deep_enough(self, model: ModelValue) -> ModelValue:
        if model.depth > MAX_MODEL_DEPTH:
            raise RecipeTypeError(
                f"this model is made of more than {MAX_MODEL_DEPTH} nested operations", model.span,
                "merge in fewer stages, or save an intermediate result and load it with model(...)",
            )
        return model

    def _models_per_input(self, op, k: ast.Kwarg, n: int, env, stack) -> tuple[ModelValue, ...]:
        """A model-valued parameter such as `fisher = [fa, fb]`: one model per input model."""
        value = self.eval(k.value, env, stack)
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

    # --- statements --------------------------------------------------------------------------

    def _save(self, stmt: ast.Save, earlier: list[SaveSpec]) -> SaveSpec:
        model = self._model(stmt.value, {}, (), "what `save` writes")
        try:
            path = (self.base_dir / os.path.expanduser(stmt.path)).resolve()
        except (OSError, ValueError, RuntimeError) as err:
            raise OutputError(f"cannot use '{stmt.path}' as an output folder: {getattr(err, 'strerror', None) or err}",
                              stmt.path_span) from None
        for other in earlier:
            if other.path == path:
                raise RecipeNameError(f"two saves write to '{stmt.path}'", stmt.path_span, f"the first is at {other.span}")
        opts = {}
        for o in stmt.options:
            if o.name not in SAVE_OPTIONS:
                raise RecipeNameError(
                    f"save has no option '{o.name}'", o.span, did_you_mean(o.name, SAVE_OPTIONS) or f"options: {', '.join(SAVE_OPTIONS)}"
                )
            if o.name in opts:
                raise RecipeNameError(f"option '{o.name}' given twice", o.span)
            opts[o.name] = o
        dtype = self._save_dtype(opts.get("dtype"))
        shard = self._save_shard(opts.get("shard"))
        tokenizer = model.config_source
        if "tokenizer" in opts:
            tokenizer = self._model(opts["tokenizer"].value, {}, (), "the tokenizer option").config_source
        if dtype is None:
            dtype = self._common_dtype(model, stmt)
        config = model.config()
        try:
            layer_map(config, model.tensors, f"the output '{stmt.path}'")
        except CheckpointError as err:  # a config that does not describe the tensors written is never saved
            raise RecipeTypeError(err.message, stmt.span, err.hint) from None
        return SaveSpec(model, path, dtype, shard, tokenizer, stmt.span, config)

    def _common_dtype(self, model: ModelValue, stmt: ast.Save) -> torch.dtype:
        """Without `dtype`, every floating tensor is saved in the dtype the input checkpoints share; where
        they disagree, in the widest of theirs (float16 with bfloat16 gives float32), with a warning."""
        by_dtype: dict[torch.dtype, list[str]] = {}
        for leaf in dict.fromkeys(model.leaves()):
            for dtype in dict.fromkeys(s.dtype for s in leaf.tensors.values() if s.dtype.is_floating_point):
                by_dtype.setdefault(dtype, []).append(_short(leaf.checkpoint.path))
        dtype = widest_dtype(by_dtype)
        if len(by_dtype) > 1:
            shown = "; ".join(f"{_DTYPE_NAMES.get(d, str(d))}: {', '.join(names)}" for d, names in by_dtype.items())
            self.warnings.append(MgcWarning(
                f"the inputs of this save are stored in different dtypes ({shown}); writing "
                f"{_DTYPE_NAMES.get(dtype, str(dtype))}, which holds them all", stmt.span,
                "set the save's dtype to choose, e.g. { dtype = bf16 }",
            ))
        return dtype

    def _save_dtype(self, option: Optional[ast.Option]) -> Optional[torch.dtype]:
        if option is None:
            return None
        v = option.value
        name = v.id if isinstance(v, ast.Name) else v.value if isinstance(v, ast.String) else None
        if name not in SAVE_DTYPES:
            raise RecipeTypeError(
                f"unknown dtype {name!r}" if name is not None else "dtype must be a name such as bf16", v.span,
                did_you_mean(str(name), SAVE_DTYPES) or "dtype is one of bf16, fp16, fp32",
            )
        return SAVE_DTYPES[name]

    def _save_shard(self, option: Optional[ast.Option]) -> int:
        if option is None:
            return DEFAULT_SHARD
        v = self.eval(option.value, {}, ())
        if isinstance(v, Num) and 1 <= v.value <= MAX_SIZE:  # false for inf and NaN too
            return int(v.value)
        if isinstance(v, Str):
            size = parse_size(v.value)
            if size:
                return size
        raise RecipeTypeError(
            "shard must be a size such as \"2GB\", \"500MB\" or a byte count", option.value.span,
            "units are B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024); sizes run from 1 "
            "byte to 2**63 - 1 bytes" if isinstance(v, (Num, Str)) else None,
        )


_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}


def widest_dtype(dtypes) -> torch.dtype:
    """The narrowest floating dtype that holds every value of each of `dtypes` (float32 when there are none)."""
    dtypes = set(dtypes)
    if not dtypes:
        return torch.float32
    if len(dtypes) == 1:
        return dtypes.pop()
    if torch.float64 in dtypes:
        return torch.float64
    return torch.float32


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
MAX_SIZE = 2**63 - 1


def parse_size(text: str) -> Optional[int]:
    """Bytes in "2GB", "512MiB", "1000"; None unless it is a size from 1 byte to MAX_SIZE."""
    from decimal import Decimal

    m = _SIZE.match(text)
    if not m:
        return None
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    # Decimal: exact, and no float overflow or int digit limit for thousands of digits
    size = Decimal(m.group(1)) * base**power
    return int(size) if 1 <= size <= MAX_SIZE else None


def _selector(key) -> Selector:
    if isinstance(key, ast.KeyName):
        if key.name == "_":
            return Selector("default", span=key.span)
        return Selector("pattern", key.name, span=key.span)
    if isinstance(key, ast.KeyString):
        return Selector("pattern", key.value, span=key.span)
    return Selector("layers", start=key.start, stop=key.stop, span=key.span)


def _layer_bounds(selector: Selector, num_layers: int) -> Selector:
    """`layers[-2:]` counts from the end, as in stack's m.layers[-2:]."""
    if selector.kind != "layers":
        return selector
    start, stop = selector.start, selector.stop
    if start is not None and start < 0:
        start += num_layers
    if stop is not None and stop < 0:
        stop += num_layers
    return dataclasses.replace(selector, start=start, stop=stop)


def _bind_layers(value: Value, num_layers: int) -> Value:
    if isinstance(value, TableV):
        return TableV(
            tuple((_layer_bounds(s, num_layers), _bind_layers(v, num_layers)) for s, v in value.entries), value.span
        )
    if isinstance(value, ListV):
        return ListV(tuple(_bind_layers(v, num_layers) for v in value.items), value.span)
    return value


def _selector_hint(selector: Selector, tensors) -> str:
    if selector.kind == "pattern":
        parts = sorted({p for n in tensors for p in n.split(".") if not p.isdigit()})
        close = did_you_mean(selector.pattern, parts)
        if close:
            return close
        return f"tensor names look like '{next(iter(tensors), '')}'"
    return "no tensor lies in that layer range"


def _same_shape(name: str, a: TensorSpec, b: TensorSpec, span: Span) -> None:
    if a.shape != b.shape:
        raise RecipeTypeError(f"tensor '{name}' has shape {list(b.shape)} here but {list(a.shape)} in the first model", span)
    if a.dtype.is_floating_point != b.dtype.is_floating_point:
        raise RecipeTypeError(f"tensor '{name}' is {b.dtype} here but {a.dtype} in the first model", span)


def _check_stack_shapes(parts: list[LayerRange]) -> None:
    first = parts[0].model
    for part in parts[1:]:
        for name, spec in part.model.tensors.items():
            other = first.tensors.get(name)
            if other is not None and other.shape != spec.shape:
                raise RecipeTypeError(
                    f"stack(): tensor '{name}' has shape {list(spec.shape)} here but {list(other.shape)} in the first part",
                    part.span,
                )


def _require_primary_stack(model: ModelValue, span: Span) -> None:
    if model.layers.primary is None:
        if model.layers.ambiguous:
            shown = ", ".join(f"'{s.prefix}' ({s.count})" for s in model.layers.stacks)
            raise RecipeTypeError(f"the model has several layer stacks ({shown}); mgc cannot tell which one to slice", span)
        raise RecipeTypeError("mgc finds no layer stack in this model's tensor names", span,
                              "layers are tensors named like 'model.layers.N.*' or 'transformer.h.N.*'")


def _describe(m: ModelValue) -> str:
    if isinstance(m, CheckpointModel):
        return f"checkpoint {m.checkpoint.path}"
    if isinstance(m, FisherModel):
        return f"the Fisher of checkpoint {m.model.checkpoint.path}"
    return "this model"


def _respan(value: Value, span: Span) -> Value:
    """A name's value, reported at the use site when it is a plain value."""
    if isinstance(value, (Num, Str, Bool, ListV, TableV)):
        return type(value)(*[getattr(value, f) for f in value.__dataclass_fields__ if f != "span"], span)
    return value


def _defined_later(recipe: ast.Recipe, e: ast.Name) -> Optional[str]:
    for stmt in recipe.statements:
        if isinstance(stmt, ast.Assign) and stmt.name == e.id:
            return f"'{e.id}' is assigned later, at {stmt.name_span}; assign it before use"
    return None


def check(recipe: ast.Recipe, allow_pickle: bool = False, base_dir: Optional[Path] = None) -> Program:
    return Checker(recipe, allow_pickle, base_dir).run()
