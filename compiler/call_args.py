"""The argument shape shared by builtins that take one positional argument and keyword options
(`fisher(m, data = ...)`, `lora("path", base = ...)`): checked once, with the same messages."""
from __future__ import annotations

from mgc.core.errors import RecipeNameError, RecipeTypeError, did_you_mean
from mgc.grammar import ast


def one_argument_and_options(fn: str, what: str, e: ast.Call, allowed: tuple[str, ...], usage: str) -> dict[str, ast.Kwarg]:
    """{option name: its keyword argument}, after checking there is exactly one positional argument (`what`,
    e.g. "one model") and only known, unrepeated options."""
    if len(e.args) != 1:
        raise RecipeTypeError(f"{fn}() takes {what}, got {len(e.args)} positional arguments", e.span, f"write {usage}")
    return named_options(fn, e, allowed)


def named_options(fn: str, e: ast.Call, allowed: tuple[str, ...]) -> dict[str, ast.Kwarg]:
    """{option name: its keyword argument}, after checking each is known and given once."""
    opts: dict[str, ast.Kwarg] = {}
    for k in e.kwargs:
        if k.name not in allowed:
            raise RecipeNameError(f"{fn}() got an unknown parameter '{k.name}'", k.span,
                                  did_you_mean(k.name, allowed) or f"parameters: {', '.join(allowed)}")
        if k.name in opts:
            raise RecipeTypeError(f"{fn}() got '{k.name}' twice", k.span)
        opts[k.name] = k
    return opts
