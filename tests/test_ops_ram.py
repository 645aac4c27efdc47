"""ram and ramplus_tl against an independent statement of their math: hand-worked cases and a float64 numpy
closed form (an entry changed by one model takes its change, times λᵢ for ramplus_tl; one changed by several
takes the mean of their changes; one changed by none keeps the base)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mgc.stdlib import OPERATORS

from conftest import call_merge

RAM, RAMPLUS = OPERATORS["ram"], OPERATORS["ramplus_tl"]


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_ram_hand_case():
    base = t(0, 0, 0, 0, 1)
    x1 = t(1, 2, 0, 3, 1)
    x2 = t(3, 0, 0, -1, 1)
    # entry 0: both change it, mean (1 + 3)/2; entry 1: x1 alone, 2 whole; entry 2: nobody; entry 3: (3 − 1)/2;
    # entry 4: nobody, the base's 1
    got = call_merge(RAM, [x1, x2], RAM.params(), base)
    assert torch.equal(got, t(2, 2, 0, 1, 1))


def test_ram_epsilon_is_a_strict_threshold():
    base = t(0, 0, 0)
    x1 = t(0.5, 0.6, 0.5)
    x2 = t(0.7, 0.5, 0.5)
    # with epsilon 0.5: entry 0 only x2 changes (0.5 is not above), entry 1 only x1, entry 2 nobody
    got = call_merge(RAM, [x1, x2], RAM.params(epsilon=0.5), base)
    assert torch.allclose(got, t(0.7, 0.6, 0.0))
    # with epsilon 0 every nonzero change counts: means everywhere
    got = call_merge(RAM, [x1, x2], RAM.params(epsilon=0.0), base)
    assert torch.allclose(got, t(0.6, 0.55, 0.5))


def test_ram_is_not_task_arithmetic_nor_a_mean():
    base, x1, x2 = t(0.0), t(4.0), t(0.0)
    # task arithmetic: 4; the mean of the task vectors: 2; ram: the change x1 made alone, 4, not diluted
    assert call_merge(RAM, [x1, x2], RAM.params(), base).item() == 4.0
    assert call_merge(RAM, [x1, x1, x2], RAM.params(), base).item() == 4.0  # two agreeing: their mean, 4


def _sparse_models(n: int, shape=(7, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        delta = torch.randn(shape, generator=g) * 0.1
        delta[torch.rand(shape, generator=g) < 0.5] = 0  # about half of each task vector unchanged
        models.append(base + delta)
    return base, models


def _closed_form(base, models, epsilon, scales=None) -> np.ndarray:
    """float64: base + Σ over the models changing an entry of (δᵢ·λᵢ if one model changes it, δᵢ/c if c do)."""
    b = base.double().numpy()
    d = np.stack([m.double().numpy() - b for m in models])
    # which entries change is decided on the float32 task vectors, as the operator sees them
    changed = np.stack([((m - base).abs() > epsilon).numpy() for m in models])
    c = changed.sum(axis=0)
    lam = np.ones(len(models)) if scales is None else np.asarray(scales, dtype=np.float64)
    unique = (d * changed * lam.reshape(-1, *[1] * b.ndim)).sum(axis=0)
    shared = (d * changed).sum(axis=0) / np.maximum(c, 1)
    return b + np.where(c == 1, unique, np.where(c > 1, shared, 0.0))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
def test_ram_closed_form(n, epsilon):
    base, models = _sparse_models(n, seed=n)
    got = call_merge(RAM, models, RAM.params(epsilon=epsilon), base)
    np.testing.assert_allclose(got.double().numpy(), _closed_form(base, models, epsilon), rtol=1e-6, atol=1e-6)


def test_ram_of_one_model_keeps_its_changes_above_epsilon():
    base, (x,) = _sparse_models(1)
    got = call_merge(RAM, [x], RAM.params(epsilon=0.05), base)
    keep = (x - base).abs() > 0.05
    assert torch.allclose(got, torch.where(keep, x, base))


def test_ramplus_tl_hand_case():
    base = torch.zeros(6)
    x1 = t(1, 2, 0, 4, 0, 0)  # changes entries 0, 1, 3
    x2 = t(3, 0, 5, 0, 0, 0)  # changes entries 0, 2
    # c = [2, 1, 1, 1, 0, 0]. Model 1: S = 1 (entry 0), U = 2 (entries 1, 3), ρ = 0.5; model 2: S = 1, U = 1, ρ = 1.
    # r = 0.5, alpha = 1: λ₁ = 1.25, λ₂ = 1.5. Entry 0: (1 + 3)/2; 1: 2·1.25; 2: 5·1.5; 3: 4·1.25
    got = call_merge(RAMPLUS, [x1, x2], RAMPLUS.params(r=0.5, alpha=1.0), base)
    assert torch.equal(got, t(2, 2.5, 7.5, 5, 0, 0))
    # alpha caps ρ: with the defaults (r = 0.1, alpha = 0.2) both λ are 1 + 0.1·0.2 = 1.02
    got = call_merge(RAMPLUS, [x1, x2], RAMPLUS.params(), base)
    assert torch.allclose(got, t(2, 2 * 1.02, 5 * 1.02, 4 * 1.02, 0, 0))
    # r = 0 is ram
    assert torch.equal(call_merge(RAMPLUS, [x1, x2], RAMPLUS.params(r=0.0), base), call_merge(RAM, [x1, x2], RAM.params(), base))


def test_ramplus_tl_without_unique_entries_is_finite():
    base = torch.zeros(4)
    x1, x2 = t(1, 2, 0, 0), t(3, 4, 0, 0)  # everything either shared or untouched: U = 0 for both, ρ = S/ε
    got = call_merge(RAMPLUS, [x1, x2], RAMPLUS.params(), base)
    assert torch.equal(got, t(2, 3, 0, 0))
    got = call_merge(RAMPLUS, [base.clone(), base.clone()], RAMPLUS.params(), base)  # S = U = 0: ρ = 0
    assert torch.equal(got, base)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 100.0)])
def test_ramplus_tl_closed_form(n, r, alpha):
    base, models = _sparse_models(n, seed=10 + n)
    epsilon = 1e-5
    changed = np.stack([((m - base).abs() > epsilon).numpy() for m in models])
    c = changed.sum(axis=0)
    scales = []
    for ch in changed:
        s, u = (ch & (c > 1)).sum(), (ch & (c == 1)).sum()
        rho = s / max(u, epsilon)
        scales.append(1 + r * min(max(rho, 0.0), alpha))
    got = call_merge(RAMPLUS, models, RAMPLUS.params(r=r, alpha=alpha), base)
    np.testing.assert_allclose(got.double().numpy(), _closed_form(base, models, epsilon, scales), rtol=1e-6, atol=1e-6)
    if n == 1:  # one model: nothing shared, λ = 1, ram
        assert torch.equal(got, call_merge(RAM, models, RAM.params(), base))


def test_params():
    assert RAM.params().epsilon == 1e-5
    p = RAMPLUS.params()
    assert (p.r, p.alpha, p.epsilon) == (0.1, 0.2, 1e-5)
    for bad in ({"epsilon": -1.0}, {"epsilon": float("nan")}, {"weights": [1.0]}):
        with pytest.raises(ValidationError):
            RAM.params(**bad)
    for bad in ({"r": -0.1}, {"alpha": -1.0}, {"epsilon": -1e-5}, {"r": float("inf")}, {"density": 0.5}):
        with pytest.raises(ValidationError):
            RAMPLUS.params(**bad)
    assert RAM.base == RAMPLUS.base == "required" and RAM.min_models == RAMPLUS.min_models == 1
    assert RAM.runs == "slices" and RAMPLUS.runs == "whole"
