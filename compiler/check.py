"""The checker: evaluates a recipe's AST into symbolic models and the outputs to write.

Everything short of reading tensor data is checked here: names, arity, parameter
types and ranges (through each operator's pydantic schema, per tensor), that every
checkpoint exists and that the tensors merged together agree in name and shape
(from safetensors headers). Errors are collected across statements and raised together.

`check` is the entry point; the work lies in interpreter.py (statements, expressions, defs), builtins.py
(model, ramp, stack, fisher), operator_call.py, inputs.py (opening checkpoints, paths) and save.py (a save and
its options); program.py holds what it returns.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from mgc.core.errors import MgcError
from mgc.grammar import ast

from .interpreter import Checker
from .program import Program, SaveSpec
from .save import parse_size, widest_dtype
from .search_space import at_defaults, bind_values, check_ends

__all__ = ["check", "Checker", "Program", "SaveSpec", "parse_size", "widest_dtype"]


def check(
    recipe: ast.Recipe, allow_pickle: bool = False, base_dir: Optional[Path] = None,
    values: Optional[Mapping[str, float]] = None,
) -> Program:
    """The recipe's relative paths resolve against `base_dir`, by default the folder of the file it was parsed
    from (mgc.core.paths.recipe_folder of its source name).

    `values` binds free parameters by name ({"merged.t": 0.7}); the others are checked at their defaults and at
    the ends of their domains (compiler/search_space.py), and the program is the one at their defaults."""
    checker = Checker(recipe, allow_pickle, base_dir)
    try:
        program = checker.run()
    except MgcError as err:
        raise at_defaults(err, checker.domains) from None
    assignment = bind_values(program.domains, values or {})
    if assignment:
        program = Checker(recipe, allow_pickle, base_dir, assignment, checker.inputs).run()
    check_ends(lambda a: Checker(recipe, allow_pickle, base_dir, a, checker.inputs).run(), program.domains, assignment)
    program.assignment = assignment
    return program
