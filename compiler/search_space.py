"""Free parameters: `search(low, high, log = false)` and `search([a, b, c])`, domains usable wherever a number is.

A recipe with domains is checked once with every domain at its default value, then once more with each domain
at each end of its range (each choice) and the others at their defaults: an operator parameter is resolved from
its values by interpolation (gradients) or lookup (tables), so a domain whose ends pass every operator's schema
stays inside it. A domain is known by the place of its `search(...)` call; its name, for `--set NAME=VALUE`,
`mgc search` and the trials' table, is derived from where it stands (`merged.t`, `merged.weights[1]`) unless
given (`search(0, 1, name = "t")`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Union

from mgc.core.errors import MgcError, MgcErrors, RecipeNameError, RecipeTypeError, Span, did_you_mean
from mgc.grammar import ast
from mgc.grammar.edits import SpanText

from .values import Bool, ListV, Num, Str, kind_of

if TYPE_CHECKING:
    from .interpreter import Checker

Number = Union[int, float]
OPTIONS = ("log", "default", "name")
USAGE = "search(0, 1), search(0.1, 10, log = true) or search([0.3, 0.5, 0.7])"


@dataclass(frozen=True)
class Domain:
    name: str
    span: Span
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: tuple[Number, ...] = ()
    default: Number = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return place(self.span)

    def ends(self) -> tuple[Number, ...]:
        """The values checked besides the default: both ends of a range, or every choice."""
        return self.choices if self.choices else (self.low, self.high)

    def contains(self, v: Number) -> bool:
        if self.choices:
            return v in self.choices
        return self.low <= v <= self.high

    def __str__(self) -> str:
        if self.choices:
            return f"search([{', '.join(_num(c) for c in self.choices)}])"
        return f"search({_num(self.low)}, {_num(self.high)}{', log = true' if self.log else ''})"


def place(span: Span) -> tuple[int, int]:
    return (span.line, span.col)


def _num(v: Number) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def search(checker: Checker, e: ast.Call, env, stack) -> Num:
    """A domain: registered with the checker; its value here is the one the check is run with."""
    domain = checker.domains.get(place(e.span)) or _domain(checker, e, env, stack)
    for other in checker.domains.values():
        if other.name == domain.name and other.key != domain.key:
            raise RecipeNameError(f"two free parameters are named '{domain.name}'", e.span,
                                  f"the other is at {other.span}; give each its own name")
    checker.domains[domain.key] = domain
    value = checker.assignment.get(domain.key, domain.default)
    return Num(value, e.span)


def _domain(checker: Checker, e: ast.Call, env, stack) -> Domain:
    opts = {}
    for k in e.kwargs:
        if k.name not in OPTIONS:
            raise RecipeNameError(f"search() got an unknown parameter '{k.name}'", k.span, f"parameters: {', '.join(OPTIONS)}")
        if k.name in opts:
            raise RecipeTypeError(f"search() got '{k.name}' twice", k.span)
        opts[k.name] = checker.eval(k.value, env, stack)
    args = [checker.eval(a, env, stack) for a in e.args]
    name = opts.get("name")
    if name is not None and not (isinstance(name, Str) and name.value.strip()):
        raise RecipeTypeError("search()'s name must be a non-empty string", name.span)
    label = name.value if name is not None else checker.domain_names.get(place(e.span), f"search@{e.span.line}:{e.span.col}")
    log = opts.get("log")
    if log is not None and not isinstance(log, Bool):
        raise RecipeTypeError(f"search()'s log must be true or false, not {kind_of(log)}", log.span)
    if len(args) == 1 and isinstance(args[0], ListV):
        domain = _choices(args[0], label, e.span, log)
    elif len(args) == 2:
        domain = _range(args, label, e.span, bool(log and log.value))
    else:
        raise RecipeTypeError(f"search() takes a low and a high bound, or a list of choices; got {len(args)} arguments",
                              e.span, f"write {USAGE}")
    default = opts.get("default")
    if default is not None:
        if not isinstance(default, Num) or not domain.contains(default.value):
            raise RecipeTypeError(f"search()'s default must be a number in {domain}", default.span)
        domain = Domain(**{**domain.__dict__, "default": default.value})
    return domain


def _choices(items: ListV, name: str, span: Span, log) -> Domain:
    if log is not None:
        raise RecipeTypeError("search() over a list of choices takes no `log`", log.span)
    if not items.items:
        raise RecipeTypeError("search() needs at least one choice", items.span, f"write {USAGE}")
    for item in items.items:
        if not isinstance(item, Num):
            raise RecipeTypeError(f"search()'s choices are numbers, not {kind_of(item)}", item.span)
    values = tuple(i.value for i in items.items)
    if len(set(values)) != len(values):
        raise RecipeTypeError("search() lists a choice twice", items.span)
    return Domain(name, span, choices=values, default=values[0])


def _range(args, name: str, span: Span, log: bool) -> Domain:
    for a in args:
        if not isinstance(a, Num) or not math.isfinite(a.value):
            raise RecipeTypeError(f"search()'s bounds are finite numbers, not {kind_of(a) if not isinstance(a, Num) else a.value}",
                                  a.span, f"write {USAGE}")
    low, high = (float(a.value) for a in args)
    if not low < high:
        raise RecipeTypeError(f"search({_num(low)}, {_num(high)}) is empty: the low bound comes first", span)
    if log and low <= 0:
        raise RecipeTypeError("search() with log = true needs a low bound above 0", args[0].span)
    default = math.sqrt(low * high) if log else (low + high) / 2
    return Domain(name, span, low, high, log, default=default)


# --- names ---------------------------------------------------------------------------------------------------


def domain_names(recipe: ast.Recipe) -> dict[tuple[int, int], str]:
    """A readable name for each search() call: the statement it stands in, and the keyword, list index and table
    key that lead to it (`merged.weights[1]`, `merged.t{layers[0:4]}`). A name two calls would share is made
    unique with the call's line and column."""
    found: list[tuple[tuple[int, int], str]] = []
    for stmt in recipe.statements:
        if isinstance(stmt, ast.Assign):
            found += _walk(stmt.value, stmt.name)
        elif isinstance(stmt, ast.Def):
            found += _walk(stmt.body, stmt.name)
        elif isinstance(stmt, ast.Save):
            found += _walk(stmt.value, "save")
    counts: dict[str, int] = {}
    for _, name in found:
        counts[name] = counts.get(name, 0) + 1
    return {key: name if counts[name] == 1 else f"{name}@{key[0]}:{key[1]}" for key, name in found}


def _walk(e: ast.Expr, path: str) -> Iterator[tuple[tuple[int, int], str]]:
    if isinstance(e, ast.Call):
        if e.func == "search":
            yield place(e.span), path
            return
        for a in e.args:
            yield from _walk(a, path)
        for k in e.kwargs:
            yield from _walk(k.value, f"{path.split('.')[0]}.{k.name}")
    elif isinstance(e, ast.List):
        for i, item in enumerate(e.items):
            yield from _walk(item, f"{path}[{i}]")
    elif isinstance(e, ast.Table):
        for entry in e.entries:
            yield from _walk(entry.value, f"{path}{{{_key_text(entry.key)}}}")
    elif isinstance(e, ast.With):
        yield from _walk(e.value, path)
        yield from _walk(e.table, path)
    elif isinstance(e, ast.LayerSlice):
        yield from _walk(e.value, path)


def _key_text(key) -> str:
    if isinstance(key, ast.KeyLayers):
        return f"layers[{'' if key.start is None else key.start}:{'' if key.stop is None else key.stop}]"
    return key.name if isinstance(key, ast.KeyName) else key.value


# --- checking over the domains ----------------------------------------------------------------------------------


def check_ends(run_check, domains: dict[tuple[int, int], Domain], assignment: dict) -> None:
    """Check the recipe again with each free domain at each end of its range (each choice), the others at their
    defaults (or the values `assignment` gives them). `run_check(assignment)` checks once; an error names the
    domain and the value that caused it."""
    for key, domain in domains.items():
        if key in assignment:
            continue
        for value in domain.ends():
            if value == domain.default:
                continue
            try:
                run_check({**assignment, key: value})
            except MgcErrors as errs:
                raise MgcErrors([_blame(e, domain, value) for e in errs.errors]) from None
            except MgcError as err:
                raise _blame(err, domain, value) from None


def _inside(a: Span, b: Span) -> bool:
    return (b.line, b.col) <= (a.line, a.col) and (a.end_line, a.end_col) <= (b.end_line, b.end_col)


def at_defaults(err: MgcError, domains: dict[tuple[int, int], Domain]) -> MgcError:
    """An error of the check at the domains' defaults, saying so where there are domains."""
    if not domains:
        return err
    shown = ", ".join(f"{d.name} = {d.default:g}" for d in domains.values())
    for e in err.errors if isinstance(err, MgcErrors) else [err]:
        e.hint = (f"{e.hint}; " if e.hint else "") + f"checked with the free parameters at their defaults ({shown})"
    return err


def _blame(err: MgcError, domain: Domain, value: Number) -> MgcError:
    note = f"at {value:g} of {domain} ({domain.name}, {domain.span})"
    if err.span is not None and _inside(domain.span, err.span):  # a value the domain gave, or a table holding it
        err.span = domain.span
        err.hint = f"the domain reaches {value:g}, outside what this parameter takes: narrow it" + (
            f"; {err.hint}" if err.hint else "")
    else:
        err.hint = f"this fails with the free parameter {note}" + (f"; {err.hint}" if err.hint else "")
    return err


def bind_values(domains: dict[tuple[int, int], Domain], values) -> dict[tuple[int, int], Number]:
    """{domain key: value} for `--set NAME=VALUE` pairs; a name no domain has, or a value outside its domain, is
    an error."""
    by_name = {d.name: d for d in domains.values()}
    out: dict[tuple[int, int], Number] = {}
    for name, value in values.items():
        domain = by_name.get(name)
        if domain is None:
            known = ", ".join(by_name) or "none: the recipe has no search(...)"
            hint = " ".join(filter(None, [did_you_mean(name, by_name), f"(free parameters: {known})"]))
            raise RecipeNameError(f"--set {name}: the recipe has no free parameter '{name}'", None, hint)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise RecipeTypeError(f"--set {name}: the value must be a finite number, not {value!r}")
        if not domain.contains(value):
            raise RecipeTypeError(f"--set {name}={value:g} is outside its domain {domain}", domain.span,
                                  "give a value inside the domain, or widen the domain in the recipe")
        out[domain.key] = value
    return out


def bound_text(text: str, domains: dict[tuple[int, int], Domain], assignment) -> str:
    """The recipe's text with each search(...) call given a value in `assignment` ({domain key: value}) replaced
    by that number, written so that it reads back as the same float."""
    source = SpanText(text)
    return source.replaced((*source.offsets(domains[key].span), _literal(value)) for key, value in assignment.items())


def _literal(v: Number) -> str:
    return repr(v) if isinstance(v, int) or not float(v).is_integer() else repr(float(v))
