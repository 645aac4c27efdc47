"""Every operator in OPERATORS follows the one contract of stdlib/operator.py: merge(tensors, params, ctx), one
declared way to run it (``runs``), no random operator run in slices, and a declared transient memory."""
from __future__ import annotations

import dataclasses
import inspect
import pkgutil
from importlib import import_module

import pytest
import torch

import mgc.stdlib as stdlib
from conftest import call_merge
from mgc.compiler.ir import Apply
from mgc.runtime import apply as ap
from mgc.stdlib import OPERATORS
from mgc.stdlib.operator import RUNS, MergeContext, Operator

NEEDED = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.1}}  # the required parameters, for a sample call


def sample(name: str, n: int, dtype=torch.float32, shape=(30, 40)):
    """(params, base or None, models) for a small call of the operator."""
    op = OPERATORS[name]
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g).to(dtype) if op.base == "required" else None
    models = [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]
    return op.params(**NEEDED.get(name, {})), base, models


def n_models(op: Operator) -> int:
    return op.max_models if op.max_models is not None else max(op.min_models, 2)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_the_contract(name):
    op = OPERATORS[name]
    assert list(inspect.signature(op.merge).parameters) == ["tensors", "params", "ctx"]
    assert op.runs in RUNS
    assert not (op.random and op.runs == "slices")
    assert op.random == ("seed" in op.params.model_fields)
    assert callable(op.transient)
    for numel, inputs, aux in ((1, 1, False), (4096 * 1024, 3, False), (4096 * 1024, 5, bool(op.model_params))):
        declared = op.transient(numel, inputs, aux)
        assert isinstance(declared, int) and declared >= 0
    assert op.result_dtype(None) == torch.float32
    assert op.result_dtype(torch.bfloat16) == (torch.float32 if op.runs == "whole" else torch.bfloat16)


def test_every_operator_module_is_registered():
    modules = {m.name for m in pkgutil.iter_modules(stdlib.__path__)}
    with_operator = {m for m in modules if hasattr(import_module(f"mgc.stdlib.{m}"), "OPERATOR")}
    assert with_operator == set(stdlib._MODULES)
    assert {import_module(f"mgc.stdlib.{m}").OPERATOR.name for m in with_operator} == set(OPERATORS)


def test_the_declaration_is_checked():
    op = OPERATORS["dare_linear"]  # random
    with pytest.raises(ValueError, match="random operator cannot run in slices"):
        dataclasses.replace(op, runs="slices")
    with pytest.raises(ValueError, match="runs must be one of"):
        dataclasses.replace(OPERATORS["linear"], runs="native")


@pytest.mark.parametrize("name", sorted(n for n, op in OPERATORS.items() if op.runs == "slices"))
def test_a_slices_operator_gives_the_same_bytes_in_slices(name, monkeypatch):
    op = OPERATORS[name]
    params, base, models = sample(name, n_models(op), torch.bfloat16)
    inputs = ([base] if base is not None else []) + models
    p = Apply(name, params, base is not None, "t", tuple(models[0].shape))
    monkeypatch.setattr(ap, "ELEMENTWISE_SLICE", 7)  # many slices, the last one partial
    sliced = ap.run_apply(p, list(inputs), torch.device("cpu"))
    whole = call_merge(op, [m.float() for m in models], params, None if base is None else base.float())
    assert torch.equal(sliced, whole)


@pytest.mark.parametrize("name", sorted(n for n, op in OPERATORS.items() if op.runs == "stored"))
def test_a_stored_operator_fills_out_from_stored_dtypes(name):
    op = OPERATORS[name]
    params, base, models = sample(name, n_models(op), torch.bfloat16)
    wide = call_merge(op, models, params, base)
    assert wide.dtype == torch.float32
    out = torch.empty(models[0].shape, dtype=torch.bfloat16)
    got = call_merge(op, models, params, base, out=out)
    assert got is out and torch.equal(got, wide.bfloat16())


@pytest.mark.parametrize("name", sorted(n for n, op in OPERATORS.items() if op.random))
def test_a_random_operator_draws_from_ctx_generator(name):
    op = OPERATORS[name]
    params, base, models = sample(name, n_models(op), shape=(1000, 1001) if name == "arcee_fusion" else (30, 40))
    if "density" in op.params.model_fields:
        params = params.model_copy(update={"density": [0.5] * len(models)})

    def draw(seed):
        return op.merge(models, params, MergeContext(base=base, generator=torch.Generator().manual_seed(seed)))

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
