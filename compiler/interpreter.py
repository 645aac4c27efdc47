"""The interpreter: walks a recipe's statements and evaluates its expressions into values (numbers, strings,
tables, symbolic models), calling defs, builtins and operators. Errors are collected per statement; a name
whose assignment failed is poisoned, so its later uses add no errors of their own."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mgc.core.errors import (
    CheckpointError, MgcError, MgcErrors, RecipeNameError, RecipeTypeError, Span, did_you_mean, end_of,
)
from mgc.core.paths import recipe_folder
from mgc.grammar import ast
from mgc.stdlib import OPERATORS

from .builtins import BUILTINS, require_primary_stack
from .heads import head_view, is_head_name
from .gate_cache import MODES as GATE_MODES
from .inputs import Inputs
from .moe_gate import outside_moe
from .operator_call import apply_operator, same_shape
from .program import Program, SaveSpec
from .save import check_save
from .search_space import domain_names
from .selectors import layer_bounds, selector_hint, selector_of
from .values import Bool, FisherModel, Function, LayerRange, ListV, ModelValue, Num, Str, TableV, Value, WithModel, kind_of

CONSTANTS = {"true": True, "false": False}
MAX_MODEL_DEPTH = 200  # operations nested in one value; deeper ones would exhaust Python's stack when lowered


class _Poisoned(Exception):
    """A name whose definition already failed: its uses report nothing more."""


class Checker:
    def __init__(self, recipe: ast.Recipe, allow_pickle: bool = False, base_dir: Optional[Path] = None,
                 assignment: Optional[dict] = None, inputs: Optional[Inputs] = None):
        self.recipe = recipe
        self.base_dir = base_dir or recipe_folder(recipe.source.name)
        self.inputs = inputs or Inputs(self.base_dir, allow_pickle)
        # search() domains by the place of their call, and the values this check gives them (else their defaults)
        self.assignment: dict = assignment or {}
        self.domains: dict = {}
        self.domain_names = domain_names(recipe)
        self.globals: dict[str, Value] = {}
        self.poisoned: set[str] = set()
        self.defs: dict[str, ast.Def] = {}
        self.fishers: dict[Path, FisherModel] = {}
        self.gates: dict[Path, object] = {}  # moe() gates by cache folder (compiler/gate_cache.py)
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
                    saves.append(check_save(self, stmt, saves))
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
        return Program(saves, self.inputs.checkpoints, self._unused(), self.fishers, self.warnings, gates=self.gates,
                       domains=self.domains)

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

    def model_of(self, e: ast.Expr, env, stack, what: str) -> ModelValue:
        """The value of `e`, which must be a model; `what` names it in the error."""
        return self.require_model(self.eval(e, env, stack), e, what)

    def require_model(self, value: Value, e: ast.Expr, what: str) -> ModelValue:
        if not isinstance(value, ModelValue):
            quoted = isinstance(value, Str) and value.value.isidentifier()
            hint = f"a model is named without quotes: write {value.value}" if quoted else None
            raise RecipeTypeError(f"{what} must be a model, not {kind_of(value)}", e.span,
                                  hint or getattr(value, "not_a_model_hint", None))  # an adapter (extract_lora)
        return value

    def deep_enough(self, model: ModelValue) -> ModelValue:
        if model.depth > MAX_MODEL_DEPTH:
            raise RecipeTypeError(
                f"this model is made of more than {MAX_MODEL_DEPTH} nested operations", model.span,
                "merge in fewer stages, or save an intermediate result and load it with model(...)",
            )
        return model

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
            entries.append((selector_of(entry.key), self.eval(entry.value, env, stack)))
        return TableV(tuple(entries), e.span)

    def _call(self, e: ast.Call, env, stack) -> Value:
        if e.func in env and isinstance(env[e.func], Function):
            return self._call_def(env[e.func].node, e, env, stack)
        if e.func in self.defs:
            return self._call_def(self.defs[e.func], e, env, stack)
        builtin = BUILTINS.get(e.func)
        if builtin is not None:
            return builtin(self, e, env, stack)
        op = OPERATORS.get(e.func)
        if op is None and e.func in GATE_MODES:
            raise outside_moe(e)
        if op is None:
            hint = did_you_mean(e.func, list(OPERATORS) + list(BUILTINS) + list(self.defs))
            raise RecipeNameError(f"unknown operator '{e.func}'", e.func_span, hint or "`mgc ops` lists the operators")
        return apply_operator(self, op, e, env, stack)

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

    def _layer_slice(self, e: ast.LayerSlice, env, stack) -> LayerRange:
        model = self.model_of(e.value, env, stack, "the value sliced with .layers[...]")
        require_primary_stack(model, e.span)
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

    def _with(self, e: ast.With, env, stack) -> WithModel:
        base = self.model_of(e.value, env, stack, "the value before `with`")
        overrides = []
        for entry in e.table.entries:
            selector = layer_bounds(selector_of(entry.key), base.num_layers)
            model = self.model_of(entry.value, env, stack, f"the override for '{selector}'")
            matched = [n for n in base.tensors if selector.matches(n, base.layers)]
            if not matched:
                raise RecipeNameError(
                    f"selector '{selector}' matches no tensor of the model", entry.key.span, selector_hint(selector, base.tensors)
                )
            for name in matched:
                if name not in model.tensors and is_head_name(name):  # a tied model's head is its embedding
                    model = head_view(model, name) or model
                if name not in model.tensors:
                    raise CheckpointError(f"the override for '{selector}' has no tensor '{name}'", entry.value.span)
                same_shape(name, base.tensors[name], model.tensors[name], entry.value.span)
            overrides.append((selector, model))
        depth = 1 + max([base.depth] + [m.depth for _, m in overrides])
        return self.deep_enough(WithModel(base, tuple(overrides), e.span, dict(base.tensors), base.layers, depth))


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
