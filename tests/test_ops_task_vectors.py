"""The sparsifying task-vector operators (DARE, Model Breadcrumbs, DELLA, SCE and their TIES variants)
against independent statements of their math: hand-worked cases, small numpy restatements, and for the
random ones the distribution of their masks.

mergekit 0.1.5 defines the math; parity with mergekit itself is checked by hand, outside this suite.
"""
from __future__ import annotations

from importlib import import_module

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mgc.runtime.apply import tensor_generator
from conftest import call_merge
from mgc.stdlib import OPERATORS
from mgc.stdlib.operator import MergeContext

NEW = ("dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce")
RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")

rng = np.random.default_rng(7)


def run(name, tensors, base, seed=0, **params):
    """The operator's output as float64 numpy; random operators get a CPU generator seeded with `seed`."""
    op = OPERATORS[name]
    ts = [torch.as_tensor(np.asarray(t, dtype=np.float32)) for t in tensors]
    b = torch.as_tensor(np.asarray(base, dtype=np.float32))
    extra = {"generator": torch.Generator().manual_seed(seed)} if op.random else {}
    out = call_merge(op, ts, op.params(**params), b, **extra)
    assert out.dtype == torch.float32 and out.shape == ts[0].shape
    return out.numpy().astype(np.float64)


def np_ties(deltas, weights, normalize=True, lam=1.0):
    """TIES' combination, restated: weighted task vectors, sign of their sum elected (0 elects +),
    sum of the agreeing ones, over the sum of the agreeing weights (a zero divisor divides by 1)."""
    d = np.asarray(deltas, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1, *[1] * (d.ndim - 1))
    wd = d * w
    elected = np.where(wd.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(wd) == elected
    mixed = np.where(agree, wd, 0.0).sum(axis=0)
    if normalize:
        div = np.where(agree, w, 0.0).sum(axis=0)
        mixed = mixed / np.where(div == 0, 1.0, div)
    return lam * mixed


def np_crumbs(delta, density, gamma):
    """Breadcrumbs' mask, restated by ranks: with N entries ranked 0..N-1 by |δ| ascending (distinct
    magnitudes), k = floor(density·N), t = floor(gamma·N), keep ranks in [max(0, N-k-t), max(0, N-k-t) + k)."""
    d = np.asarray(delta, dtype=np.float64)
    n = d.size
    k, t = int(np.floor(density * n)), int(np.floor(gamma * n))
    lo = max(0, n - k - t)
    rank = np.argsort(np.argsort(np.abs(d).ravel())).reshape(d.shape)
    return (rank >= lo) & (rank < lo + k)


def l1_rescaled(delta, keep):
    d = np.asarray(delta, dtype=np.float64)
    return np.where(keep, d, 0.0) * np.abs(d).sum() / np.abs(np.where(keep, d, 0.0)).sum()


# ---------------------------------------------------------------- registry and schemas


def test_registry_and_metadata():
    for name in NEW:
        op = OPERATORS[name]
        assert op.name == name and op.doc and op.reference and op.base == "required" and op.min_models == 1
        assert op.random == (name in RANDOM)
        fields = op.params.model_fields
        for p in op.per_model:
            assert p in fields and fields[p].json_schema_extra["default_text"]
        if op.random:
            assert fields["seed"].default == 0
        else:
            assert "seed" not in fields
        assert "int8_mask" not in fields  # no effect on results in mergekit: left out
    assert OPERATORS["sce"].per_model == ()
    assert set(OPERATORS["breadcrumbs"].per_model) == {"weights", "density", "gamma"}
    assert set(OPERATORS["della"].per_model) == {"weights", "density", "epsilon"}
    assert set(OPERATORS["dare_ties"].per_model) == {"weights", "density"}


@pytest.mark.parametrize(
    "name,normalize,rescale",
    [  # mergekit's defaults
        ("dare_linear", False, True),
        ("dare_ties", False, True),
        ("breadcrumbs", False, False),
        ("breadcrumbs_ties", False, False),
        ("della", True, True),
        ("della_linear", False, True),
    ],
)
def test_defaults(name, normalize, rescale):
    p = OPERATORS[name].params()
    assert p.normalize is normalize and p.rescale is rescale and p.lambda_ == 1.0
    assert p.density is None and p.weights is None  # 1.0 each


@pytest.mark.parametrize("name", NEW)
def test_shape_dtype_and_inputs_untouched(name):
    ts = [torch.tensor(rng.standard_normal((6, 8)), dtype=torch.float32) for _ in range(3)]
    base = torch.tensor(rng.standard_normal((6, 8)), dtype=torch.float32)
    before = [t.clone() for t in ts + [base]]
    op = OPERATORS[name]
    params = {"select_topk": 0.5} if name == "sce" else {"density": [0.5, 0.6, 0.7]}
    extra = {"generator": torch.Generator().manual_seed(1)} if op.random else {}
    out = call_merge(op, ts, op.params(**params), base, **extra)
    assert out.dtype == torch.float32 and out.shape == (6, 8) and torch.isfinite(out).all()
    assert all(torch.equal(a, b) for a, b in zip(ts + [base], before))


@pytest.mark.parametrize("name", [n for n in NEW if n != "sce"])
def test_density_default_and_one_is_plain_combination(name):
    # density 1 (the default) sparsifies nothing: the linear ones are task arithmetic, the others TIES
    base = rng.standard_normal((5, 7))
    xs = [base + rng.standard_normal((5, 7)) for _ in range(3)]
    w = [0.5, 1.0, -0.3]
    deltas = [x - base for x in xs]
    for params in ({}, {"density": [1.0, 1.0, 1.0]}):
        out = run(name, xs, base, weights=w, lambda_=0.7, **params)
        if name.endswith("linear") or name == "breadcrumbs":
            normalize = OPERATORS[name].params().normalize
            expected = 0.7 * sum(wi * d for wi, d in zip(w, deltas)) / (sum(w) if normalize else 1)
        else:
            expected = np_ties(deltas, w, normalize=OPERATORS[name].params().normalize, lam=0.7)
        np.testing.assert_allclose(out, base + expected, rtol=1e-5, atol=1e-5)


def test_params_validation():
    for name in NEW:
        P = OPERATORS[name].params
        with pytest.raises(ValidationError):
            P(unknown=1)
        with pytest.raises(ValidationError):
            P(int8_mask=True)
        if name == "sce":
            continue
        for bad in ([0.0], [1.5], [-0.1], [0.5, 1.01]):
            with pytest.raises(ValidationError):
                P(density=bad)
        assert P(**{"lambda": 2.0}).lambda_ == 2.0
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        for bad in ([-0.1], [1.1]):
            with pytest.raises(ValidationError):
                OPERATORS[name].params(gamma=bad)
        OPERATORS[name].params(gamma=[0.0, 1.0], density=[0.3, 0.3])
    for name in RANDOM:
        with pytest.raises(ValidationError):
            OPERATORS[name].params(seed=-1)
        assert OPERATORS[name].params(seed=5).seed == 5
    for name in ("della", "della_linear"):
        P = OPERATORS[name].params
        for bad in ({"epsilon": [-0.1]}, {"density": [0.1]},  # 0.1 - 0.15 (the default) <= 0
                    {"density": [0.9], "epsilon": [0.15]}, {"density": [0.85], "epsilon": [0.15]},
                    {"density": [0.5, 0.3], "epsilon": [0.1, 0.3]}):
            with pytest.raises(ValidationError, match="epsilon"):
                P(**bad)
        P(density=[1.0], epsilon=[0.5])  # nothing pruned: epsilon unused
        P(density=[0.5, 1.0], epsilon=[0.4, 0.9])
        P(epsilon=[0.3])
    P = OPERATORS["sce"].params
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValidationError):
            P(select_topk=bad)
    assert P().select_topk == 1.0


def test_per_model_length_mismatch_is_refused():
    base = np.zeros(4)
    with pytest.raises(ValueError, match="density"):
        run("breadcrumbs", [np.ones(4), np.ones(4)], base, density=[0.5])
    with pytest.raises(ValueError, match="weights"):
        run("dare_ties", [np.ones(4), np.ones(4)], base, weights=[1.0, 2.0, 3.0])


# ---------------------------------------------------------------- breadcrumbs

#             0     1    2    3     4    5    6     7    8     9
DELTA = [0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 1.0, -0.4, 0.6, -0.8]  # magnitudes 0.1 … 1.0, all distinct


def test_breadcrumbs_hand_cases():
    base = np.zeros(10)
    # N = 10, k = 5, t = 2: drop the 3 smallest (0.1, 0.2, 0.3) and the 2 largest (1.0, 0.9)
    kept = [0, 0, 0.5, 0, -0.7, 0, 0, -0.4, 0.6, -0.8]
    np.testing.assert_allclose(run("breadcrumbs", [DELTA], base, density=[0.5], gamma=[0.2]), kept, rtol=1e-7)
    # floors: int(0.55·10) = 5, int(0.29·10) = 2
    np.testing.assert_allclose(run("breadcrumbs", [DELTA], base, density=[0.55], gamma=[0.29]), kept, rtol=1e-7)
    # density + gamma > 1: k = 7, t = 5, N - k - t < 0 → keep the 7 smallest (only 3 outliers dropped)
    np.testing.assert_allclose(
        run("breadcrumbs", [DELTA], base, density=[0.7], gamma=[0.5]), [0.1, 0, 0.5, 0.3, -0.7, 0.2, 0, -0.4, 0.6, 0],
        rtol=1e-7,
    )
    # default gamma 0.01: int(0.1) = 0 outliers on 10 entries → plain top-3 by magnitude
    np.testing.assert_allclose(run("breadcrumbs", [DELTA], base, density=[0.3]), [0, -0.9, 0, 0, 0, 0, 1.0, 0, 0, -0.8])
    # gamma 0.01 on 200 entries drops the 2 largest
    big = rng.permutation(np.arange(1, 201)) * rng.choice([-1.0, 1.0], 200)
    out = run("breadcrumbs", [big], np.zeros(200), density=[0.5])
    assert set(np.abs(out[out != 0]).astype(int)) == set(range(99, 199))
    # density 1 keeps everything, whatever gamma
    np.testing.assert_allclose(run("breadcrumbs", [DELTA], base, gamma=[0.5]), DELTA, rtol=1e-7)
    # k = int(0.05·10) = 0 keeps nothing (no error)
    np.testing.assert_array_equal(run("breadcrumbs", [DELTA], base, density=[0.05], gamma=[0.0]), np.zeros(10))
    # rescale: kept entries times ‖δ‖₁ / ‖kept‖₁ = 5.5 / 3.0
    np.testing.assert_allclose(
        run("breadcrumbs", [DELTA], base, density=[0.5], gamma=[0.2], rescale=True), np.array(kept) * 5.5 / 3.0,
        rtol=1e-6,
    )


def test_breadcrumbs_weights_normalize_lambda():
    base = np.full(10, 2.0)
    d2 = np.array(DELTA[::-1])
    xs = [base + np.array(DELTA), base + d2]
    m1 = np.array([0, 0, 0.5, 0, -0.7, 0, 0, -0.4, 0.6, -0.8])
    m2 = m1[::-1]
    p = {"density": [0.5, 0.5], "gamma": [0.2, 0.2], "weights": [1.0, 3.0]}
    np.testing.assert_allclose(run("breadcrumbs", xs, base, **p), base + m1 + 3 * m2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        run("breadcrumbs", xs, base, normalize=True, lambda_=0.5, **p), base + 0.5 * (m1 + 3 * m2) / 4, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("shape", [(300,), (12, 25), (3, 4, 10)])
def test_breadcrumbs_random_against_rank_statement(shape):
    base = rng.standard_normal(shape)
    xs = [base + rng.standard_normal(shape) * s for s in (0.5, 1.0, 2.0)]
    deltas = [(x.astype(np.float32) - base.astype(np.float32)).astype(np.float64) for x in xs]
    dens, gam, w = [0.4, 0.7, 0.2], [0.05, 0.2, 0.0], [1.0, -0.5, 2.0]
    for rescale in (False, True):
        crumbs = [
            l1_rescaled(d, np_crumbs(d, a, g)) if rescale else np.where(np_crumbs(d, a, g), d, 0.0)
            for d, a, g in zip(deltas, dens, gam)
        ]
        p = dict(density=dens, gamma=gam, weights=w, rescale=rescale)
        np.testing.assert_allclose(
            run("breadcrumbs", xs, base, normalize=True, lambda_=1.5, **p),
            base + 1.5 * sum(wi * c for wi, c in zip(w, crumbs)) / sum(w), rtol=1e-5, atol=1e-5,
        )
        np.testing.assert_allclose(
            run("breadcrumbs_ties", xs, base, **p), base + np_ties(crumbs, w, normalize=False), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            run("breadcrumbs_ties", xs, base, normalize=True, **p), base + np_ties(crumbs, w), rtol=1e-5, atol=1e-5
        )


def test_breadcrumbs_ties_hand_case():
    base = np.zeros(5)
    # density 0.6, gamma 0.2 on 5 entries: k = 3, t = 1, n_bot = 1: drop the smallest and the largest
    a = [4.0, -1.0, 2.0, -3.0, 0.5]  # keeps -1, 2, -3
    b = [-2.0, 3.0, -1.5, 0.2, 5.0]  # keeps -2, 3, -1.5
    # crumbs: (0,-1,2,-3,0), (-2,3,-1.5,0,0); sums (-2,2,0.5,-3,0) → signs (-,+,+,-,+)
    # agreeing: (-2, 3, 2, -3, none)
    p = {"density": [0.6, 0.6], "gamma": [0.2, 0.2]}
    np.testing.assert_allclose(run("breadcrumbs_ties", [a, b], base, **p), [-2.0, 3.0, 2.0, -3.0, 0.0])
    np.testing.assert_allclose(run("breadcrumbs", [a, b], base, **p), [-2.0, 2.0, 0.5, -3.0, 0.0])


# ---------------------------------------------------------------- DARE


def test_dare_kept_fraction_and_kept_values():
    delta = rng.standard_normal(200_000) + 0.01
    for density in (0.1, 0.3, 0.8):
        out = run("dare_linear", [delta], np.zeros_like(delta), seed=3, density=[density], rescale=False)
        kept = out != 0
        assert abs(kept.mean() - density) < 5 * np.sqrt(density * (1 - density) / delta.size)
        np.testing.assert_array_equal(out[kept], delta.astype(np.float32)[kept])


def test_dare_rescale_is_l1_ratio_close_to_one_over_density():
    delta = rng.standard_normal(100_000)
    for density in (0.2, 0.5, 0.9):
        out = run("dare_linear", [delta], np.zeros_like(delta), seed=4, density=[density])
        kept = out != 0
        d32 = delta.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(out, l1_rescaled(d32, kept), rtol=1e-6)
        factor = np.abs(d32).sum() / np.abs(d32[kept]).sum()
        assert factor == pytest.approx(1 / density, rel=0.02)


def test_dare_rescaled_expectation_is_the_task_vector():
    delta = rng.uniform(0.5, 2.0, 2000) * rng.choice([-1.0, 1.0], 2000)
    density, seeds = 0.5, 400
    for rescale, target in ((True, delta), (False, density * delta)):
        mean = np.mean(
            [run("dare_linear", [delta], np.zeros(2000), seed=s, density=[density], rescale=rescale) for s in range(seeds)],
            axis=0,
        )
        ratio = mean / target
        sigma = np.sqrt((1 - density) / density / seeds)  # per entry, for the rescaled case
        assert abs(ratio.mean() - 1) < 0.02
        assert np.abs(ratio - 1).max() < 5 * sigma


def test_dare_seeds_and_models_independent():
    base = rng.standard_normal((40, 50))
    x = base + rng.standard_normal((40, 50))
    for name in ("dare_linear", "dare_ties"):
        a = run(name, [x, x], base, seed=11, density=[0.5, 0.5])
        np.testing.assert_array_equal(a, run(name, [x, x], base, seed=11, density=[0.5, 0.5]))
        assert not np.array_equal(a, run(name, [x, x], base, seed=12, density=[0.5, 0.5]))
    # the two (identical) models get different masks
    only0 = run("dare_linear", [x, x], np.zeros_like(x), seed=1, density=[0.5, 0.5], weights=[1.0, 0.0])
    only1 = run("dare_linear", [x, x], np.zeros_like(x), seed=1, density=[0.5, 0.5], weights=[0.0, 1.0])
    assert not np.array_equal(only0 != 0, only1 != 0)


def test_runtime_generators_per_tensor_and_seed():
    op = OPERATORS["dare_ties"]
    base = torch.zeros(30, 30)
    xs = [torch.randn(30, 30, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    p = op.params(density=[0.4, 0.4], seed=5)

    def go(seed, tensor):
        return call_merge(op, xs, p, base, generator=tensor_generator(seed, tensor))

    assert torch.equal(go(5, "model.layers.0.mlp.up_proj.weight"), go(5, "model.layers.0.mlp.up_proj.weight"))
    assert not torch.equal(go(5, "model.layers.0.mlp.up_proj.weight"), go(5, "model.layers.1.mlp.up_proj.weight"))
    assert not torch.equal(go(5, "model.layers.0.mlp.up_proj.weight"), go(6, "model.layers.0.mlp.up_proj.weight"))


def sparsified_one_by_one(name, xs, seed, **params):
    """Each model's sparsified task vector, as the operator drew it: with base 0 and weight 1 on model i
    (0 on the others) a linear operator returns exactly that model's sparsified vector."""
    n = len(xs)
    return [
        run(name, xs, np.zeros_like(xs[0]), seed=seed, weights=[float(i == j) for j in range(n)], **params)
        for i in range(n)
    ]


@pytest.mark.parametrize("rescale", [False, True])
def test_dare_ties_is_dare_then_ties(rescale):
    xs = [rng.standard_normal((20, 30)) * s for s in (1.0, 2.0, 0.5)]
    dens, w = [0.3, 0.6, 0.9], [1.0, 0.7, 1.5]
    sparse = sparsified_one_by_one("dare_linear", xs, 9, density=dens, rescale=rescale)
    for s, d, x in zip(sparse, dens, xs):
        kept = s != 0
        assert abs(kept.mean() - d) < 0.1
        np.testing.assert_allclose(s, l1_rescaled(x.astype(np.float32), kept) if rescale else np.where(kept, x.astype(np.float32), 0), rtol=1e-6)
    for normalize in (False, True):
        out = run("dare_ties", xs, np.zeros((20, 30)), seed=9, density=dens, weights=w, rescale=rescale,
                  normalize=normalize, lambda_=0.8)
        np.testing.assert_allclose(out, np_ties(sparse, w, normalize=normalize, lam=0.8), rtol=1e-5, atol=1e-6)
    lin = run("dare_linear", xs, np.zeros((20, 30)), seed=9, density=dens, weights=w, rescale=rescale, normalize=True)
    np.testing.assert_allclose(lin, sum(wi * s for wi, s in zip(w, sparse)) / sum(w), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DELLA


def della_probability(rank, n, density, epsilon):
    """DELLA's keep probability for 1-based magnitude rank `rank` of `n`: linear from d − ε to d + ε."""
    return density - epsilon + 2 * epsilon * (rank - 1) / (n - 1)


def test_della_keep_probabilities_by_rank_within_rows():
    # each row a permutation of magnitudes 1..9, rows scaled very differently: ranks are per row
    rows, n = 20_000, 9
    mags = np.argsort(rng.random((rows, n)), axis=1) + 1.0
    delta = mags * rng.choice([-1.0, 1.0], (rows, n)) * 10.0 ** rng.uniform(-3, 3, (rows, 1))
    for density, epsilon in ((0.5, 0.15), (0.3, 0.25), (0.6, 0.0)):
        out = run("della_linear", [delta], np.zeros_like(delta), seed=2, density=[density], epsilon=[epsilon],
                  rescale=False)
        for r in range(1, n + 1):
            p = della_probability(r, n, density, epsilon)
            freq = (out[mags == r] != 0).mean()
            assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / rows), (density, epsilon, r)


def test_della_one_dimensional_tensor_is_one_row():
    n = 100_000
    delta = (rng.permutation(n) + 1.0) * rng.choice([-1.0, 1.0], n)
    out = run("della_linear", [delta], np.zeros(n), seed=5, density=[0.4], epsilon=[0.3], rescale=False)
    kept = out != 0
    rank = np.abs(delta)
    for lo in range(0, n, n // 10):  # ten rank bands
        band = (rank > lo) & (rank <= lo + n // 10)
        p = della_probability(rank[band], n, 0.4, 0.3).mean()
        assert abs(kept[band].mean() - p) < 5 * np.sqrt(0.25 / band.sum())


def test_della_ties_in_magnitude_and_single_entry_rows():
    # equal magnitudes are ranked by position: the keep probability rises along the row
    rows = 20_000
    out = run("della_linear", [np.ones((rows, 3))], np.zeros((rows, 3)), seed=1, density=[0.5], epsilon=[0.3],
              rescale=False)
    np.testing.assert_allclose((out != 0).mean(axis=0), [0.2, 0.5, 0.8], atol=0.02)
    # a row of one entry: kept with probability density
    out = run("della_linear", [rng.standard_normal((rows, 1))], np.zeros((rows, 1)), seed=1, density=[0.3],
              epsilon=[0.2], rescale=False)
    assert abs((out != 0).mean() - 0.3) < 0.02


@pytest.mark.parametrize("rescale", [False, True])
def test_della_is_della_prune_then_ties(rescale):
    xs = [rng.standard_normal((30, 40)) * s for s in (1.0, 2.0, 0.5)]
    dens, eps, w = [0.3, 0.6, 1.0], [0.2, 0.1, 0.15], [1.0, 0.7, 1.5]
    sparse = sparsified_one_by_one("della_linear", xs, 4, density=dens, epsilon=eps, rescale=rescale)
    for s, x in zip(sparse, xs):
        kept = s != 0
        x32 = x.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(s, l1_rescaled(x32, kept) if rescale else np.where(kept, x32, 0), rtol=1e-6)
    np.testing.assert_array_equal(sparse[2], xs[2].astype(np.float32))  # density 1: untouched
    for normalize in (False, True):
        out = run("della", xs, np.zeros((30, 40)), seed=4, density=dens, epsilon=eps, weights=w, rescale=rescale,
                  normalize=normalize)
        np.testing.assert_allclose(out, np_ties(sparse, w, normalize=normalize), rtol=1e-5, atol=1e-6)
    a = run("della", xs, np.zeros((30, 40)), seed=4, density=dens, epsilon=eps)
    np.testing.assert_array_equal(a, run("della", xs, np.zeros((30, 40)), seed=4, density=dens, epsilon=eps))
    assert not np.array_equal(a, run("della", xs, np.zeros((30, 40)), seed=5, density=dens, epsilon=eps))


def test_della_rescaled_expectation_close_to_task_vector():
    delta = rng.uniform(0.5, 2.0, (50, 40)) * rng.choice([-1.0, 1.0], (50, 40))
    mean = np.mean([run("della_linear", [delta], np.zeros_like(delta), seed=s, density=[0.5], epsilon=[0.2])
                    for s in range(300)], axis=0)
    # the L1 rescaling restores the total magnitude on average; larger entries are kept more often
    assert np.abs(mean).sum() == pytest.approx(np.abs(delta).sum(), rel=0.01)


# ---------------------------------------------------------------- SCE


def test_sce_hand_case_with_selection():
    base = np.zeros(4)
    d1, d2, d3 = [2.0, 1.0, 0.5, -1.0], [4.0, -3.0, 0.5, 1.0], [0.0, 2.0, 0.5, -4.0]
    # population variances: 8/3, 14/3, 0, 114/27; nonzero 3, k = int(3·0.7) = 2 → entries 1 and 3
    # selected: (0,1,0,-1), (0,-3,0,1), (0,2,0,-4); mean squares 2/4, 10/4, 20/4 → weights 1/16, 5/16, 10/16
    # entry 1: sum 0 elects +, agreeing 1 and 2: (1/16·1 + 10/16·2) / (11/16) = 21/11
    # entry 3: sum -4 elects -, agreeing -1 and -4: (-1/16 − 40/16) / (11/16) = -41/11
    np.testing.assert_allclose(run("sce", [d1, d2, d3], base, select_topk=0.7), [0, 21 / 11, 0, -41 / 11], rtol=1e-6)
    # k = int(3·0.5) = 1 → entry 1 only; weights 1/14, 9/14, 4/14; + elected, agreeing 1 and 2
    np.testing.assert_allclose(
        run("sce", [1 + np.array(d) for d in (d1, d2, d3)], base + 1, select_topk=0.5), 1 + np.array([0, (1 + 8) / 5, 0, 0]),
        rtol=1e-6,
    )


def test_sce_hand_case_without_selection():
    base = np.zeros(4)
    d1, d2, d3 = [2.0, 1.0, 0.5, -1.0], [4.0, -3.0, 0.5, 1.0], [0.0, 2.0, 0.5, -4.0]
    e1, e2, e3 = 6.25, 26.25, 20.25  # sums of squares (the weights are proportional to them)
    expected = [
        (e1 * 2 + e2 * 4) / (e1 + e2),  # sum 6 elects +: models 1 and 2 (model 3's zero never agrees)
        (e1 * 1 + e3 * 2) / (e1 + e3),  # sum 0 elects +
        0.5,  # all agree
        (e1 * -1 + e3 * -4) / (e1 + e3),  # sum -4 elects -
    ]
    np.testing.assert_allclose(run("sce", [d1, d2, d3], base), expected, rtol=1e-6)
    np.testing.assert_allclose(run("sce", [d1, d2, d3], base, select_topk=1.0), expected, rtol=1e-6)


def test_sce_edge_cases():
    x, base = rng.standard_normal(20), rng.standard_normal(20)
    np.testing.assert_allclose(run("sce", [x], base), x.astype(np.float32), rtol=1e-6, atol=1e-6)
    # one model has no variance: nothing is selected, the result is base
    np.testing.assert_array_equal(run("sce", [x], base, select_topk=0.5), base.astype(np.float32))
    # all task vectors zero: base
    np.testing.assert_array_equal(run("sce", [base, base], base), base.astype(np.float32))
    # k = int(nnz · select_topk) in float32: float32(0.29)·100 rounds to 29.0 (28.999… in float64)
    d = [rng.standard_normal(100), rng.standard_normal(100)]
    assert np.count_nonzero(run("sce", d, np.zeros(100), select_topk=0.29)) == 29
    assert np.count_nonzero(run("sce", d, np.zeros(100), select_topk=0.5)) == 50


def np_sce(xs, base, topk):
    """SCE restated in float64 (distinct variances assumed)."""
    d = np.array([np.asarray(x, np.float64) - base for x in xs])
    if topk < 1:
        var = d.var(axis=0)
        k = int(np.float32(np.count_nonzero(var)) * np.float32(topk))
        keep = np.zeros(var.size, bool)
        keep[np.argsort(-var.ravel())[:k]] = True
        d = d * keep.reshape(var.shape)
    energy = (d ** 2).reshape(len(xs), -1).mean(axis=1)
    w = energy / energy.sum()
    elected = np.where(d.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(d) == elected
    ww = np.where(agree, w.reshape(-1, *[1] * base.ndim), 0.0)
    return base + (d * ww).sum(axis=0) / np.maximum(ww.sum(axis=0), 1e-6)


@pytest.mark.parametrize("shape", [(64,), (10, 12), (2, 5, 6)])
def test_sce_random_against_restatement(shape):
    base = rng.standard_normal(shape)
    xs = [base + rng.standard_normal(shape) * s for s in (0.3, 1.0, 2.0, 0.7)]
    b32 = base.astype(np.float32).astype(np.float64)
    x32 = [x.astype(np.float32).astype(np.float64) for x in xs]
    for topk in (1.0, 0.8, 0.3):
        np.testing.assert_allclose(run("sce", xs, base, select_topk=topk), np_sce(x32, b32, topk), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- task vectors: merge_deltas

# Each task-vector operator's module computes merge() as its merge_deltas() of the xᵢ − base.
DELTA_OPS = sorted(name for name in OPERATORS if hasattr(import_module(f"mgc.stdlib.{name}"), "merge_deltas"))
SPARSE = {
    "ties": {"density": [0.5, 0.7, 0.3], "rescale": True},
    "dare_linear": {"density": [0.5, 0.7, 0.3]}, "dare_ties": {"density": [0.5, 0.7, 0.3]},
    "breadcrumbs": {"density": [0.5, 0.7, 0.3]}, "breadcrumbs_ties": {"density": [0.5, 0.7, 0.3]},
    "della": {"density": [0.5, 0.6, 0.4]}, "della_linear": {"density": [0.5, 0.6, 0.4]},
    "sce": {"select_topk": 0.5}, "task_arithmetic": {"weights": [0.5, 0.3, 0.2], "lambda": 1.2},
}


def test_the_task_vector_operators_are_the_ones_with_merge_deltas():
    assert set(DELTA_OPS) == set(SPARSE)
    assert all(OPERATORS[name].base == "required" for name in DELTA_OPS)


@pytest.mark.parametrize("name", DELTA_OPS)
def test_merge_is_merge_deltas_of_the_task_vectors_bit_for_bit(name):
    op = OPERATORS[name]
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 9, generator=g)
    xs = [base + torch.randn(12, 9, generator=g) * s for s in (0.5, 1.0, 2.0)]
    params = op.params(**SPARSE[name], **({"seed": 4} if op.random else {}))

    def extra():
        return {"generator": tensor_generator(4, "w")} if op.random else {}

    deltas = [x - base for x in xs]
    kept = [d.clone() for d in deltas]
    from_models = call_merge(op, xs, params, base, **extra())
    from_deltas = import_module(f"mgc.stdlib.{name}").merge_deltas(deltas, params, MergeContext(base=base, **extra()))
    assert torch.equal(from_models, from_deltas)
    assert len(deltas) == 3 and all(torch.equal(d, k) for d, k in zip(deltas, kept))  # shared inputs untouched


@pytest.mark.parametrize("pair", [("dare_linear", "dare_ties"), ("breadcrumbs", "breadcrumbs_ties"),
                                  ("della", "della_linear")])
def test_paired_operators_share_their_parameters(pair):
    first, second = (OPERATORS[name].params for name in pair)
    assert issubclass(second, first)
    assert list(first.model_fields) == list(second.model_fields)
    differing = {k for k in first.model_fields if repr(first.model_fields[k]) != repr(second.model_fields[k])}
    assert differing == {"normalize"}
