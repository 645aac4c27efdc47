"""mgc's merge operators, one module each. ``OPERATORS`` maps the name users type to it."""
from __future__ import annotations

from collections import ChainMap
from importlib import import_module
from typing import Mapping

from .operator import MergeContext, Operator, OpParams

_MODULES = (
    "linear",
    "slerp",
    "karcher",
    "task_arithmetic",
    "ties",
    "passthrough",
    "multislerp",
    "nuslerp",
    "model_stock",
    "arcee_fusion",
    "nearswap",
    "fisher_merge",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "ram",
    "ramplus_tl",
    "consensus_ta",
    "consensus_ties",
)

OPERATORS: dict[str, Operator] = {}
for _name in _MODULES:
    _op = import_module(f"{__name__}.{_name}").OPERATOR
    OPERATORS[_op.name] = _op

# Operations the runtime runs but a recipe cannot call by name: lora()'s low-rank update and extract_lora()'s
# factors (lowered by the compiler).
INTERNAL_OPERATORS: dict[str, Operator] = {
    "lora": import_module(f"{__name__}.lora_update").INTERNAL_OPERATOR,
    "extract_lora": import_module(f"{__name__}.lora_extract").INTERNAL_OPERATOR,
}
# every operation an apply node may name: a live view, so a test's stand-in for an operator is what runs
RUNNABLE: Mapping[str, Operator] = ChainMap(OPERATORS, INTERNAL_OPERATORS)

__all__ = ["OPERATORS", "INTERNAL_OPERATORS", "RUNNABLE", "MergeContext", "Operator", "OpParams"]
