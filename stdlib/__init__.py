"""mgc's merge operators, one module each. ``OPERATORS`` maps the name users type to it."""
from __future__ import annotations

from importlib import import_module

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
)

OPERATORS: dict[str, Operator] = {}
for _name in _MODULES:
    _op = import_module(f"{__name__}.{_name}").OPERATOR
    OPERATORS[_op.name] = _op

__all__ = ["OPERATORS", "MergeContext", "Operator", "OpParams"]
