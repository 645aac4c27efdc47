"""consensus_ta and consensus_ties against an independent statement of the TALL-mask math (Wang et al. 2024,
arXiv:2405.07813): hand-worked cases, a float64 numpy closed form, and the reductions k = 0 (plain task
arithmetic / TIES) and k > number of models (the base)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mgc.stdlib import OPERATORS

from conftest import call_merge

CTA, CTIES = OPERATORS["consensus_ta"], OPERATORS["consensus_ties"]


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _hand_ta():
    base = t(2, 2, 2, 2)
    deltas = [t(1, 1, 0, 2), t(1, 0, 0, -2), t(1, 0, 3, 1)]
    return base, [base + d for d in deltas]


@pytest.mark.parametrize("k,kept", [(0, [1, 1, 1, 1]), (1, [1, 1, 1, 1]), (2, [1, 0, 0, 1]), (3, [1, 0, 0, 0]), (4, [0, 0, 0, 0])])
def test_consensus_ta_hand_case(k, kept):
    base, models = _hand_ta()
    # normalize: τ = the mean task vector = [1, 1/3, 1, 1/3]. TALL masks |δᵢ| >= |τ − δᵢ| (λᵢ = 1):
    #   entry 0: every model (1 >= 0);  entry 1: model 1 only (1 >= 2/3; 0 >= 1/3 fails twice);
    #   entry 2: model 3 only (3 >= 2);  entry 3: models 1 (2 >= 5/3) and 3 (1 >= 2/3), not 2 (2 >= 7/3 fails)
    # so the counts are [3, 1, 1, 2]
    tau = torch.tensor([1, 1 / 3, 1, 1 / 3])
    got = call_merge(CTA, models, CTA.params(normalize=True, k=k), base)
    assert torch.allclose(got, base + tau * torch.tensor(kept, dtype=torch.float32))


def test_consensus_ta_tall_lambda_and_scale():
    base, models = _hand_ta()
    # λᵢ = 0: every mask holds everywhere (|δᵢ| >= 0), so k = 3 keeps all of τ
    got = call_merge(CTA, models, CTA.params(normalize=True, k=3, tall_lambda=[0, 0, 0]), base)
    assert torch.allclose(got, base + torch.tensor([1, 1 / 3, 1, 1 / 3]))
    # a large λ for model 3 takes entries 2 and 3 out of its mask: counts [2, 1, 0, 1]
    got = call_merge(CTA, models, CTA.params(normalize=True, k=2, tall_lambda=[1, 1, 100]), base)
    assert torch.allclose(got, base + t(1, 0, 0, 0))
    # lambda scales τ before the masks: τ = 2·[3, 1, 3, 1] (the plain sum); entry 3: 2 >= |2 − 2| for model 1,
    # 2 >= |2 + 2| fails for model 2, 1 >= |2 − 1| for model 3
    got = call_merge(CTA, models, CTA.params(k=2, **{"lambda": 2.0}), base)
    # entry 0: |1| >= |6 − 1| fails for all three; entry 1: 1 >= 1 (model 1), 0 >= 2 fails twice; entry 2: model 3
    # only (3 >= 3); entry 3: models 1 and 3
    assert torch.allclose(got, base + t(0, 0, 0, 2))


def test_consensus_ties_hand_case():
    base = torch.zeros(2)
    models = [t(1, -2), t(3, 1), t(-1, 1)]
    # density 1: entry 0 elects + (sum 3), the agreeing 1 and 3 average to 2; entry 1 sums to 0, elects +,
    # the agreeing 1 and 1 average to 1. τ = [2, 1]. Masks: model 1 [1 >= 1, 2 >= 3] = [yes, no];
    # model 2 [3 >= 1, 1 >= 0] = [yes, yes]; model 3 [1 >= 3, 1 >= 0] = [no, yes]: counts [2, 2]
    assert torch.equal(call_merge(CTIES, models, CTIES.params(k=2), base), t(2, 1))
    assert torch.equal(call_merge(CTIES, models, CTIES.params(k=3), base), t(0, 0))
    # density 0.5 keeps one entry of each: [0, −2], [3, 0], [−1, 0] (equal magnitudes: the first). Entry 0
    # elects + (3 − 1), only model 2 agrees: 3; entry 1 elects −: −2. τ = [3, −2]. Masks on the untrimmed δ:
    # model 1 [1 >= 2, 2 >= 0], model 2 [3 >= 0, 1 >= 3], model 3 [1 >= 4, 1 >= 3]: counts [1, 1]
    p = dict(density=[0.5, 0.5, 0.5])
    assert torch.equal(call_merge(CTIES, models, CTIES.params(k=1, **p), base), t(3, -2))
    assert torch.equal(call_merge(CTIES, models, CTIES.params(k=2, **p), base), t(0, 0))


def _models(n, seed, shape=(9, 11)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * 0.1 for _ in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_consensus_ta_closed_form(n, k, normalize):
    base, models = _models(n, seed=100 * n + k)
    w = np.linspace(0.5, 1.5, n)
    lam = np.linspace(0.4, 1.6, n)
    b = base.double().numpy()
    d = np.stack([m.double().numpy() - b for m in models])
    tau = 0.7 * np.tensordot(w, d, axes=1) / (w.sum() if normalize else 1.0)
    masks = np.abs(d) >= lam.reshape(-1, 1, 1) * np.abs(tau - d)
    want = b + tau * (masks.sum(axis=0) >= k)
    params = CTA.params(weights=list(w), tall_lambda=list(lam), k=k, normalize=normalize, **{"lambda": 0.7})
    got = call_merge(CTA, models, params, base)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    if 1 < k <= n:  # the case keeps some entries and drops others
        assert 0 < (masks.sum(axis=0) >= k).mean() < 1


def _ties_tau(d: np.ndarray, w: np.ndarray, density: float) -> np.ndarray:
    """TIES in float64: trim each task vector to its top int(density·numel) magnitudes, elect signs by the
    weighted sum, the disjoint weighted mean of the agreeing entries."""
    trimmed = []
    for di in d:
        flat = np.abs(di).ravel()
        keep = max(1, int(density * flat.size))
        cut = np.sort(flat)[::-1][keep - 1]
        trimmed.append(np.where(np.abs(di) >= cut, di, 0.0))
    wd = np.stack(trimmed) * w.reshape(-1, 1, 1)
    sign = np.where(wd.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(wd) == sign
    div = (agree * w.reshape(-1, 1, 1)).sum(axis=0)
    return (wd * agree).sum(axis=0) / np.where(div == 0, 1.0, div)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("density", [1.0, 0.4])
def test_consensus_ties_closed_form(n, k, density):
    base, models = _models(n, seed=7 * n + k)
    w = np.linspace(0.6, 1.2, n)
    b = base.double().numpy()
    d = np.stack([m.double().numpy() - b for m in models])
    tau = _ties_tau(d, w, density)
    masks = np.abs(d) >= np.abs(tau - d)
    want = b + tau * (masks.sum(axis=0) >= k)
    got = call_merge(CTIES, models, CTIES.params(weights=list(w), density=[density] * n, k=k), base)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_k_zero_is_the_plain_method_and_k_above_n_the_base():
    base, models = _models(3, seed=1)
    ta, ties = OPERATORS["task_arithmetic"], OPERATORS["ties"]
    got = call_merge(CTA, models, CTA.params(k=0, weights=[1, 0.5, 2]), base)
    assert torch.equal(got, call_merge(ta, models, ta.params(weights=[1, 0.5, 2]), base))
    got = call_merge(CTIES, models, CTIES.params(k=0, density=[0.3] * 3), base)
    assert torch.equal(got, call_merge(ties, models, ties.params(density=[0.3] * 3), base))
    for op in (CTA, CTIES):
        assert torch.equal(call_merge(op, models, op.params(k=4), base), base)


def test_params():
    p = CTA.params()
    assert (p.k, p.tall_lambda, p.normalize, p.lambda_) == (2, None, False, 1.0)
    p = CTIES.params()
    assert (p.k, p.tall_lambda, p.normalize, p.rescale, p.density) == (2, None, True, False, None)
    for op in (CTA, CTIES):
        for bad in ({"k": -1}, {"tall_lambda": [-1.0]}, {"tall_lambda": [float("inf")]}, {"epsilon": 0.1}):
            with pytest.raises(ValidationError):
                op.params(**bad)
        assert "tall_lambda" in op.per_model and op.base == "required" and op.min_models == 1
    base, models = _models(2, seed=3)
    with pytest.raises(ValueError, match="tall_lambda"):
        call_merge(CTA, models, CTA.params(tall_lambda=[1.0, 1.0, 1.0]), base)
