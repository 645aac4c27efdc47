"""mgc.stdlib operators against independent statements of their math (closed forms, hand-worked cases)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import call_merge
from mgc.stdlib import OPERATORS


def run(name, tensors, base=None, **params):
    op = OPERATORS[name]
    ts = [torch.as_tensor(np.asarray(t, dtype=np.float32)) for t in tensors]
    b = None if base is None else torch.as_tensor(np.asarray(base, dtype=np.float32))
    out = call_merge(op, ts, op.params(**params), b)
    assert out.dtype == torch.float32 and out.shape == ts[0].shape
    return out.numpy().astype(np.float64)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def slerp_formula(t, a, b):
    """Shoemake's slerp of a and b by the angle between them (no fallback)."""
    th = math.acos(np.dot(unit(a), unit(b)))
    return math.sin((1 - t) * th) / math.sin(th) * np.asarray(a) + math.sin(t * th) / math.sin(th) * np.asarray(b)


rng = np.random.default_rng(0)


# ---------------------------------------------------------------- registry


def test_registry_and_metadata():
    assert {"linear", "slerp", "karcher", "task_arithmetic", "ties", "passthrough"} <= set(OPERATORS)
    for name, op in OPERATORS.items():
        assert op.name == name and op.doc and op.reference
        fields = op.params.model_fields
        for p in op.per_model:
            assert p in fields
        assert set(op.required_model_params) <= set(op.model_params)
        assert not op.random or "seed" in fields
    assert OPERATORS["slerp"].min_models == OPERATORS["slerp"].max_models == 2
    assert OPERATORS["passthrough"].max_models == 1
    assert OPERATORS["ties"].base == OPERATORS["task_arithmetic"].base == "required"


@pytest.mark.parametrize(
    "name,n,base,params",
    [
        ("linear", 3, False, {}),
        ("slerp", 2, False, {"t": 0.3}),
        ("karcher", 3, False, {}),
        ("task_arithmetic", 3, True, {}),
        ("ties", 3, True, {"density": [0.5, 0.7, 1.0]}),
        ("passthrough", 1, False, {}),
    ],
)
def test_shape_dtype_and_inputs_untouched(name, n, base, params):
    ts = [rng.standard_normal((3, 4)) for _ in range(n)]
    b = rng.standard_normal((3, 4)) if base else None
    before = [t.astype(np.float32).copy() for t in ts]
    torch_ts = [torch.tensor(t, dtype=torch.float32) for t in ts]
    op = OPERATORS[name]
    out = call_merge(op, torch_ts, op.params(**params), None if b is None else torch.tensor(b, dtype=torch.float32))
    assert out.dtype == torch.float32 and out.shape == (3, 4)
    assert all(np.array_equal(t.numpy(), e) for t, e in zip(torch_ts, before))
    assert all(out is not t for t in torch_ts)


# ---------------------------------------------------------------- linear


def test_linear_hand_case():
    a, b = [1.0, 2.0], [3.0, 6.0]
    np.testing.assert_allclose(run("linear", [a, b], weights=[1, 3]), [2.5, 5.0])
    np.testing.assert_allclose(run("linear", [a, b], weights=[1, 3], normalize=False), [10.0, 20.0])
    np.testing.assert_allclose(run("linear", [a, b]), [2.0, 4.0])  # default: plain mean
    np.testing.assert_allclose(run("linear", [a, b], weights=[2, -1]), [-1.0, -2.0])  # negative weights allowed


def test_linear_weight_scale_and_permutation_invariance():
    xs = [rng.standard_normal(7) for _ in range(3)]
    w = [0.2, 0.5, 1.3]
    ref = run("linear", xs, weights=w)
    np.testing.assert_allclose(run("linear", xs, weights=[10 * v for v in w]), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run("linear", xs[::-1], weights=w[::-1]), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref, sum(wi * x for wi, x in zip(w, xs)) / sum(w), rtol=1e-6, atol=1e-6)


def test_linear_params():
    with pytest.raises(ValidationError, match="weights"):
        OPERATORS["linear"].params(weights=[1.0, -1.0])
    OPERATORS["linear"].params(weights=[1.0, -1.0], normalize=False)
    with pytest.raises(ValidationError):
        OPERATORS["linear"].params(weight=[1.0])  # unknown key


# ---------------------------------------------------------------- slerp


def test_slerp_orthogonal_midpoint():
    np.testing.assert_allclose(run("slerp", [[1, 0, 0], [0, 1, 0]], t=0.5), [1 / math.sqrt(2), 1 / math.sqrt(2), 0], atol=1e-7)


def test_slerp_hand_angle():
    # angle π/4 between a and b; t = 1/3: s0 = sin(π/6)/sin(π/4) = 1/√2, s1 = sin(π/12)/sin(π/4)
    a, b = np.array([2.0, 0.0]), np.array([3.0, 3.0])
    s0, s1 = 1 / math.sqrt(2), math.sin(math.pi / 12) / math.sin(math.pi / 4)
    np.testing.assert_allclose(run("slerp", [a, b], t=1 / 3), s0 * a + s1 * b, rtol=1e-6)


def test_slerp_matches_formula_random():
    a, b = rng.standard_normal(50), 3 * rng.standard_normal(50)
    for t in (0.1, 0.5, 0.77):
        np.testing.assert_allclose(run("slerp", [a, b], t=t), slerp_formula(t, a, b), rtol=1e-5, atol=1e-5)


def test_slerp_endpoints_exact():
    a, b = rng.standard_normal(20).astype(np.float32), rng.standard_normal(20).astype(np.float32)
    np.testing.assert_array_equal(run("slerp", [a, b], t=0.0), a)
    np.testing.assert_allclose(run("slerp", [a, b], t=1.0), b, rtol=1e-6, atol=1e-6)


def test_slerp_preserves_equal_norms():
    a, b = unit(rng.standard_normal(100)) * 5, unit(rng.standard_normal(100)) * 5
    for t in (0.25, 0.5, 0.9):
        assert np.linalg.norm(run("slerp", [a, b], t=t)) == pytest.approx(5.0, rel=1e-5)


def test_slerp_lerp_fallback_threshold():
    def at_cos(c):
        return np.array([1.0, 0.0]), np.array([c, math.sqrt(1 - c * c)])

    a, b = at_cos(0.9997)  # above 0.9995: plain lerp, whose midpoint is shorter than 1
    np.testing.assert_allclose(run("slerp", [a, b], t=0.5), 0.5 * a + 0.5 * b, rtol=1e-6)
    a, b = at_cos(0.999)  # below: true slerp, norm 1
    out = run("slerp", [a, b], t=0.5)
    np.testing.assert_allclose(out, slerp_formula(0.5, a, b), rtol=1e-6)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-6)
    # antiparallel also falls back to lerp
    np.testing.assert_allclose(run("slerp", [[1.0, 2.0], [-2.0, -4.0]], t=0.25), [0.25, 0.5], rtol=1e-6)


def test_slerp_zero_tensor_like_mergekit():
    # a zero tensor is left unnormalised, so cos θ = 0: θ = π/2 and the result is sin(tπ/2)·b
    b = np.array([1.0, -2.0, 3.0])
    np.testing.assert_allclose(run("slerp", [np.zeros(3), b], t=0.3), math.sin(0.15 * math.pi) * b, rtol=1e-6)


def test_slerp_params():
    P = OPERATORS["slerp"].params
    for bad in ({"t": 1.5}, {"t": -0.1}, {}):
        with pytest.raises(ValidationError):
            P(**bad)


# ---------------------------------------------------------------- karcher

PRECISE = {"max_iter": 100, "tol": 1e-12}


def test_karcher_two_models_is_slerp_of_directions_with_mean_norm():
    a, b = 2 * unit(rng.standard_normal(30)), 5 * unit(rng.standard_normal(30))
    for t in (0.2, 0.5, 0.8):
        out = run("karcher", [a, b], weights=[1 - t, t], **PRECISE)
        assert np.linalg.norm(out) == pytest.approx((1 - t) * 2 + t * 5, rel=1e-6)
        np.testing.assert_allclose(unit(out), slerp_formula(t, unit(a), unit(b)), atol=1e-6)


def test_karcher_equals_slerp_for_equal_norms():
    a, b = 3 * unit(rng.standard_normal(40)), 3 * unit(rng.standard_normal(40))
    np.testing.assert_allclose(run("karcher", [a, b], weights=[0.7, 0.3], **PRECISE), run("slerp", [a, b], t=0.3), atol=1e-6)


def test_karcher_points_on_a_great_circle():
    # On one great circle the sphere is an arc: the weighted Karcher mean sits at the weighted mean angle.
    q, _ = np.linalg.qr(rng.standard_normal((10, 2)))
    e1, e2 = q[:, 0], q[:, 1]
    phis, norms, w = [0.0, 0.5, 1.2], [1.0, 2.0, 4.0], [1.0, 2.0, 3.0]
    xs = [n * (math.cos(p) * e1 + math.sin(p) * e2) for p, n in zip(phis, norms)]
    out = run("karcher", xs, weights=w)  # default max_iter/tol
    phi = sum(wi * p for wi, p in zip(w, phis)) / sum(w)
    scale = sum(wi * n for wi, n in zip(w, norms)) / sum(w)
    np.testing.assert_allclose(out, scale * (math.cos(phi) * e1 + math.sin(phi) * e2), atol=1e-5)
    # three equally spaced points, equal weights: the middle one
    xs = [math.cos(p) * e1 + math.sin(p) * e2 for p in (0.2, 0.9, 1.6)]
    np.testing.assert_allclose(run("karcher", xs), xs[1], atol=1e-6)


def test_karcher_permutation_and_weight_scale_invariance():
    xs = [rng.standard_normal(25) * s for s in (1, 2, 3)]
    ref = run("karcher", xs, weights=[1, 1, 2], **PRECISE)
    np.testing.assert_allclose(run("karcher", xs, weights=[2, 2, 4], **PRECISE), ref, atol=1e-6)
    np.testing.assert_allclose(run("karcher", xs[::-1], weights=[2, 1, 1], **PRECISE), ref, atol=1e-6)
    assert np.linalg.norm(ref) == pytest.approx(sum(w * np.linalg.norm(x) for w, x in zip([0.25, 0.25, 0.5], xs)), rel=1e-6)


def test_karcher_first_order_optimality():
    xs = [rng.standard_normal(60) for _ in range(5)]
    w = np.array([1.0, 2.0, 0.5, 1.5, 3.0])
    alpha = w / w.sum()
    for params, bound in ((PRECISE, 1e-9), ({}, 1e-4)):
        u = unit(run("karcher", xs, weights=list(w), **params))
        grad = np.zeros_like(u)
        for a, x in zip(alpha, xs):
            ui = unit(x)
            c = np.clip(np.dot(u, ui), -1, 1)
            v = ui - c * u  # tangent part of uᵢ at u; Log_u(uᵢ) = θ·v/‖v‖
            grad += a * math.acos(c) * v / np.linalg.norm(v)
        assert np.linalg.norm(grad) < bound + 1e-6  # + float32 output rounding


def test_karcher_one_step_by_hand():
    # u0 = normalise(¼e1 + ¼e2 + ½e3) = (1,1,2)/√6; each uᵢ = eᵢ, cos θᵢ = u0ᵢ
    xs = [[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]]
    alpha = [0.25, 0.25, 0.5]
    u0 = np.array([1.0, 1.0, 2.0]) / math.sqrt(6)
    T = np.zeros(3)
    for i, a in enumerate(alpha):
        c = u0[i]
        th = math.acos(c)
        T += a * th / math.sin(th) * (np.eye(3)[i] - c * u0)
    nT = np.linalg.norm(T)
    u1 = math.cos(nT) * u0 + math.sin(nT) * T / nT
    expected = (0.25 * 2 + 0.25 * 3 + 0.5 * 1) * u1 / np.linalg.norm(u1)
    np.testing.assert_allclose(run("karcher", xs, weights=[1, 1, 2], max_iter=1, tol=1e-12), expected, atol=1e-6)


def test_karcher_zero_norm_sources():
    a, b = 2 * unit(rng.standard_normal(10)), 4 * unit(rng.standard_normal(10))
    out = run("karcher", [a, np.zeros(10), b], **PRECISE)
    assert np.linalg.norm(out) == pytest.approx(2.0, rel=1e-6)  # (2 + 0 + 4) / 3
    np.testing.assert_allclose(unit(out), unit(run("karcher", [a, b], **PRECISE)), atol=1e-6)
    np.testing.assert_array_equal(run("karcher", [np.zeros(4), np.zeros(4)]), np.zeros(4))
    # the only weighted source is zero: no direction, zero scale
    np.testing.assert_array_equal(run("karcher", [np.zeros(4), np.ones(4)], weights=[1, 0]), np.zeros(4))


def test_karcher_single_model_and_antipodal():
    x = rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(run("karcher", [x]), x)
    out = run("karcher", [[1.0, 0.0], [-1.0, 0.0]])  # no unique mean: stays finite, keeps the mean norm
    assert np.all(np.isfinite(out)) and np.linalg.norm(out) == pytest.approx(1.0)


def test_karcher_params():
    P = OPERATORS["karcher"].params
    for bad in ({"weights": [-1.0, 2.0]}, {"weights": [0.0, 0.0]}, {"max_iter": 0}, {"tol": 0.0}):
        with pytest.raises(ValidationError):
            P(**bad)
    with pytest.raises(ValidationError, match="weights"):
        P(weights=[0.0, 0.0])


# ---------------------------------------------------------------- task_arithmetic


def test_task_arithmetic_closed_form():
    base, x1, x2 = [1.0, 1.0], [2.0, 0.0], [0.0, 3.0]
    # deltas (1, -1), (-1, 2); weights (1, 2) → Σ wδ = (-1, 3)
    np.testing.assert_allclose(run("task_arithmetic", [x1, x2], base, weights=[1, 2]), [0.0, 4.0])
    np.testing.assert_allclose(run("task_arithmetic", [x1, x2], base, weights=[1, 2], **{"lambda": 0.5}), [0.5, 2.5])
    np.testing.assert_allclose(
        run("task_arithmetic", [x1, x2], base, weights=[1, 2], normalize=True, lambda_=0.5), [5 / 6, 1.5], rtol=1e-6
    )
    # a zero weight sum divides by 1, as mergekit does
    np.testing.assert_allclose(run("task_arithmetic", [x1, x2], base, weights=[1, -1], normalize=True), [3.0, -2.0])
    np.testing.assert_allclose(run("task_arithmetic", [x1], base), x1)


# ---------------------------------------------------------------- ties

D1 = [0.5, -1.0, 0.2, 0.0, 2.0]
D2 = [-0.3, -0.4, 0.8, 1.0, -0.1]
D3 = [0.1, 0.6, -0.9, 0.3, -0.5]


def test_ties_hand_case():
    base = np.ones(5)
    xs = [base + np.array(d) for d in (D1, D2, D3)]
    # trim: k = int(0.6·5) = 3 → (0.5, -1, 0, 0, 2); k = int(0.5·5) = 2 → (0, 0, 0.8, 1, 0); density 1 keeps D3.
    # weighted (w = 1, 2, 1): (0.5,-1,0,0,2), (0,0,1.6,2,0), (0.1,0.6,-0.9,0.3,-0.5)
    # sums (0.6,-0.4,0.7,2.3,1.5) → elected signs (+,-,+,+,+)
    # agreeing sums (0.6,-1,1.6,2.3,2) over agreeing weights (2,1,2,3,1)
    p = {"weights": [1, 2, 1], "density": [0.6, 0.5, 1.0]}
    np.testing.assert_allclose(run("ties", xs, base, **p), 1 + np.array([0.3, -1.0, 0.8, 2.3 / 3, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(
        run("ties", xs, base, normalize=False, **p), 1 + np.array([0.6, -1.0, 1.6, 2.3, 2.0]), rtol=1e-6
    )
    np.testing.assert_allclose(
        run("ties", xs, base, **{"lambda": 0.5}, **p), 1 + 0.5 * np.array([0.3, -1.0, 0.8, 2.3 / 3, 2.0]), rtol=1e-6
    )


def test_ties_sign_election():
    base = np.zeros(4)
    # entry 0: +3 vs -1 -1 → + wins though outnumbered; entry 1: sum 0 elects +; entry 2: all zero → 0; entry 3: -
    xs = [[3.0, 1.0, 0.0, -2.0], [-1.0, -1.0, 0.0, 1.0], [-1.0, 0.0, 0.0, -0.5]]
    np.testing.assert_allclose(run("ties", xs, base), [3.0, 1.0, 0.0, -1.25])
    np.testing.assert_allclose(run("ties", xs, base, normalize=False), [3.0, 1.0, 0.0, -2.5])


def test_ties_density_one_keeps_everything():
    base = rng.standard_normal(30)
    xs = [base + np.abs(rng.standard_normal(30)) for _ in range(3)]  # all deltas positive: no conflicts
    np.testing.assert_allclose(
        run("ties", xs, base, weights=[1, 2, 3], normalize=False),
        run("task_arithmetic", xs, base, weights=[1, 2, 3]),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(run("ties", xs, base), np.mean(xs, axis=0), rtol=1e-6, atol=1e-6)


def test_ties_trim_count_and_ties_in_magnitude():
    base = np.zeros(10)
    x = np.ones(10)  # all magnitudes tied
    for density, k in ((0.5, 5), (0.35, 3), (0.99, 9), (0.1, 1)):
        assert np.count_nonzero(run("ties", [x], base, density=[density])) == k
    # int(0.05 * 10) = 0, but mergekit 0.1.5 keeps at least one entry
    assert np.count_nonzero(run("ties", [x], base, density=[0.05])) == 1


def test_ties_params():
    P = OPERATORS["ties"].params
    for bad in ({"density": [0.0]}, {"density": [1.5]}, {"density": [0.5, -0.1]}):
        with pytest.raises(ValidationError):
            P(**bad)
    assert P(**{"lambda": 2.0}).lambda_ == 2.0 and P(lambda_=3.0).lambda_ == 3.0
    assert P().normalize is True and OPERATORS["task_arithmetic"].params().normalize is False


# ---------------------------------------------------------------- passthrough


def test_passthrough():
    x = rng.standard_normal((2, 3))
    np.testing.assert_allclose(run("passthrough", [x]), x.astype(np.float32))
    np.testing.assert_allclose(run("passthrough", [x], scale=-0.5), -0.5 * x.astype(np.float32))
