"""multislerp, nuslerp, model_stock, arcee_fusion and nearswap against independent statements of their math:
hand-worked small cases, closed forms written out here in float64 numpy, and invariants."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import call_merge
from mgc.stdlib import OPERATORS

NAMES = ("multislerp", "nuslerp", "model_stock", "arcee_fusion", "nearswap")


def run(name, tensors, base=None, **params):
    op = OPERATORS[name]
    ts = [torch.as_tensor(np.asarray(t, dtype=np.float32)) for t in tensors]
    b = None if base is None else torch.as_tensor(np.asarray(base, dtype=np.float32))
    out = call_merge(op, ts, op.params(**params), b)
    assert out.dtype == torch.float32 and out.shape == ts[0].shape
    return out.numpy().astype(np.float64)


def f32(x):
    """The float32 value of x, in float64 (what the operators actually see)."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def slerp_formula(t, a, b):
    """Shoemake's slerp of a and b by the angle between them (no fallback)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    th = math.acos(np.clip(np.dot(unit(a).ravel(), unit(b).ravel()), -1, 1))
    return math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b


rng = np.random.default_rng(1)


# ---------------------------------------------------------------- registry and contract


def test_registered_with_mergekit_arity():
    arity = {  # (min_models, max_models, base): mergekit's contract with the base as mgc's `base =` keyword
        "multislerp": (1, None, "optional"),  # base optional, >= 1 non-base
        "nuslerp": (2, 2, "optional"),  # base optional, exactly 2 non-base
        "model_stock": (2, None, "required"),  # base required, >= 3 inputs counting it
        "arcee_fusion": (1, 1, "required"),  # base required, exactly 2 inputs counting it
        "nearswap": (1, 1, "required"),  # base required, exactly 2 inputs counting it
    }
    for name, (lo, hi, base) in arity.items():
        op = OPERATORS[name]
        assert op.name == name and op.doc and op.reference
        assert (op.min_models, op.max_models, op.base) == (lo, hi, base)
        for p in op.per_model:
            f = op.params.model_fields[p]
            assert f.default is None and f.json_schema_extra["default_text"]
        for f in op.params.model_fields.values():
            assert f.description
    assert OPERATORS["multislerp"].per_model == OPERATORS["nuslerp"].per_model == ("weights",)
    assert OPERATORS["arcee_fusion"].random and "seed" in OPERATORS["arcee_fusion"].params.model_fields
    assert not any(OPERATORS[n].random for n in NAMES if n != "arcee_fusion")


@pytest.mark.parametrize(
    "name,n,base,params",
    [
        ("multislerp", 3, False, {}),
        ("multislerp", 3, True, {"weights": [1, 2, 3]}),
        ("nuslerp", 2, False, {"nuslerp_flatten": False}),
        ("nuslerp", 2, True, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        ("model_stock", 3, True, {}),
        ("model_stock", 3, True, {"filter_wise": True}),
        ("arcee_fusion", 1, True, {}),
        ("nearswap", 1, True, {"t": 0.1}),
    ],
)
def test_shape_dtype_and_inputs_untouched(name, n, base, params):
    ts = [torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float32) for _ in range(n)]
    b = torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float32) if base else None
    before = [t.clone() for t in ts] + ([b.clone()] if base else [])
    op = OPERATORS[name]
    out = call_merge(op, ts, op.params(**params), b)
    assert out.dtype == torch.float32 and out.shape == (3, 4) and torch.isfinite(out).all()
    assert all(torch.equal(t, e) for t, e in zip(ts + ([b] if base else []), before))
    assert all(out is not t for t in ts) and out is not b


# ---------------------------------------------------------------- multislerp


def multislerp_formula(xs, weights, base=None, normalize=True, eps=1e-8):
    """mergekit's tangent-space closed form, step by step in float64."""
    xs = [np.asarray(x, dtype=np.float64).ravel() for x in xs]
    if base is not None:
        xs = [x - np.ravel(base) for x in xs]
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.array([np.linalg.norm(x) for x in xs])
    us = [x / (n + eps) for x, n in zip(xs, norms)]
    m = sum(wi * u for wi, u in zip(w, us))
    m = m / np.linalg.norm(m)
    tangent = sum(wi * (u - np.dot(u, m) * m) for wi, u in zip(w, us))  # projection onto the tangent space at m
    tn = np.linalg.norm(tangent) + eps
    out = (m * math.cos(tn) + tangent * math.sin(tn) / tn) * np.dot(w, norms)
    return out if base is None else out + np.ravel(base)


def test_multislerp_two_unit_vectors_equal_weights_is_slerp_midpoint():
    a, b = unit(rng.standard_normal(12)), unit(rng.standard_normal(12))
    out = run("multislerp", [a, b])
    np.testing.assert_allclose(out, slerp_formula(0.5, a, b), atol=1e-6)
    # different norms: the direction is still the midpoint of the directions, the length the mean length
    out = run("multislerp", [2 * a, 5 * b])
    np.testing.assert_allclose(unit(out), slerp_formula(0.5, a, b), atol=1e-6)
    assert np.linalg.norm(out) == pytest.approx(3.5, rel=1e-6)


def test_multislerp_hand_case():
    # u = e1, e2; weights 1/4, 3/4: m̂ = (1, 3)/√10; Σ wᵢ‖xᵢ‖ = 2/4 + 3·3/4 = 11/4
    out = run("multislerp", [[2.0, 0.0], [0.0, 3.0]], weights=[1, 3])
    np.testing.assert_allclose(out, 11 / 4 * np.array([1.0, 3.0]) / math.sqrt(10), rtol=1e-6)
    # unnormalised weights: same direction, length Σ wᵢ‖xᵢ‖ = 2 + 9
    out = run("multislerp", [[2.0, 0.0], [0.0, 3.0]], weights=[1, 3], normalize_weights=False)
    np.testing.assert_allclose(out, 11 * np.array([1.0, 3.0]) / math.sqrt(10), rtol=1e-6)
    # with a base: the same on the task vectors, base added back
    base = np.array([1.0, -1.0])
    out = run("multislerp", [base + [2.0, 0.0], base + [0.0, 3.0]], base, weights=[1, 3])
    np.testing.assert_allclose(out, base + 11 / 4 * np.array([1.0, 3.0]) / math.sqrt(10), rtol=1e-6)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_tangent_space_closed_form(with_base, normalize):
    xs = [f32(rng.standard_normal((4, 5)) * s) for s in (1.0, 2.0, 0.5)]
    base = f32(rng.standard_normal((4, 5))) if with_base else None
    w = [0.2, 0.5, 0.3] if normalize else [1.0, 0.4, 2.0]
    out = run("multislerp", xs, base, weights=w, normalize_weights=normalize)
    expected = multislerp_formula(xs, w, base, normalize).reshape(4, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # the tangent mean vanishes identically, so this is the normalised weighted mean direction × mean norm
    d = [x - (base if with_base else 0) for x in xs]
    wn = np.asarray(w) / (sum(w) if normalize else 1)
    m = sum(wi * unit(x) for wi, x in zip(wn, d))
    simple = unit(m) * sum(wi * np.linalg.norm(x) for wi, x in zip(wn, d)) + (base if with_base else 0)
    np.testing.assert_allclose(out, simple, rtol=1e-5, atol=1e-5)


def test_multislerp_permutation_and_weight_scale_invariance():
    xs = [rng.standard_normal(20) * s for s in (1.0, 3.0, 2.0, 0.7)]
    base = rng.standard_normal(20)
    w = [0.1, 0.4, 0.2, 0.3]
    ref = run("multislerp", xs, base, weights=w)
    perm = [2, 0, 3, 1]
    np.testing.assert_allclose(run("multislerp", [xs[i] for i in perm], base, weights=[w[i] for i in perm]), ref, atol=1e-5)
    np.testing.assert_allclose(run("multislerp", xs, base, weights=[5 * v for v in w]), ref, atol=1e-5)
    np.testing.assert_allclose(run("multislerp", xs[:2]), run("multislerp", xs[:2][::-1]), atol=1e-6)


def test_multislerp_degenerate_directions():
    a = np.array([1.0, 2.0, -2.0])
    np.testing.assert_array_equal(run("multislerp", [a]), a)  # one model: itself
    # two antipodal directions with equal weight: linear fallback ½a + ½(−2a) = −½a
    np.testing.assert_allclose(run("multislerp", [a, -2 * a]), -0.5 * a, atol=1e-6)
    # ... with a base too
    base = np.array([3.0, 0.0, 1.0])
    np.testing.assert_allclose(run("multislerp", [base + a, base - 2 * a], base), base - 0.5 * a, atol=1e-6)
    # three directions balancing out (120° apart): refused, as mergekit
    s = math.sqrt(3) / 2
    with pytest.raises(ValueError, match="zero"):
        run("multislerp", [[1.0, 0.0], [-0.5, s], [-0.5, -s]])
    # every task vector zero (a tensor no model changed): the base, where mergekit would refuse
    np.testing.assert_array_equal(run("multislerp", [base, base, base], base), base)
    # a zero task vector drops out of the direction and adds 0 to the mean length
    d = np.array([0.0, 3.0, 4.0])
    np.testing.assert_allclose(run("multislerp", [base, base + d], base), base + 0.5 * d, atol=1e-6)


def test_multislerp_params():
    P = OPERATORS["multislerp"].params
    assert P().normalize_weights is True and P().eps == 1e-8 and P().weights is None
    for bad in ({"weights": [1.0, -1.0]}, {"eps": 0.0}, {"eps": -1e-8}, {"weights": [float("nan"), 1.0]}, {"weight": [1.0]}):
        with pytest.raises(ValidationError):
            P(**bad)
    P(weights=[1.0, -1.0], normalize_weights=False)


# ---------------------------------------------------------------- nuslerp


def test_nuslerp_is_slerp_with_t_from_weights():
    a, b = rng.standard_normal((6, 7)), 2 * rng.standard_normal((6, 7))
    for w, t in (([1, 1], 0.5), ([1, 3], 0.75), ([3, 1], 0.25), ([2, -0.5], -1 / 3), ([1, -1], 0.5)):
        np.testing.assert_allclose(run("nuslerp", [a, b], weights=w), slerp_formula(t, a, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run("nuslerp", [a, b]), slerp_formula(0.5, a, b), rtol=1e-5, atol=1e-5)  # default
    # and agrees with mgc's slerp away from its lerp fallback
    np.testing.assert_allclose(run("nuslerp", [a, b], weights=[0.7, 0.3]), run("slerp", [a, b], t=0.3), atol=1e-5)


def test_nuslerp_hand_angle():
    # angle π/4 between a and b; weights (2, 1) → t = 1/3: s0 = sin(π/6)/sin(π/4) = 1/√2, s1 = sin(π/12)/sin(π/4)
    a, b = np.array([2.0, 0.0]), np.array([3.0, 3.0])
    s0, s1 = 1 / math.sqrt(2), math.sin(math.pi / 12) / math.sin(math.pi / 4)
    np.testing.assert_allclose(run("nuslerp", [a, b], weights=[2, 1]), s0 * a + s1 * b, rtol=1e-6)


def test_nuslerp_row_and_column_modes_by_hand():
    m0 = np.array([[1.0, 0.0], [0.0, 1.0]])
    m1 = np.array([[1.0, 1.0], [0.0, 1.0]])
    s = math.sin(math.pi / 8) / math.sin(math.pi / 4)  # t = ½ between e and (1, 1): θ = π/4
    # rows: row 0 slerps (1,0)→(1,1); row 1 is colinear and lerps (0,1)→(0,1)
    np.testing.assert_allclose(run("nuslerp", [m0, m1], nuslerp_flatten=False), [[2 * s, s], [0.0, 1.0]], rtol=1e-6)
    # columns (row_wise): column 0 is colinear (1,0)→(1,0); column 1 slerps (0,1)→(1,1)
    np.testing.assert_allclose(
        run("nuslerp", [m0, m1], nuslerp_flatten=False, nuslerp_row_wise=True), [[1.0, s], [0.0, 2 * s]], rtol=1e-6
    )
    # flatten (the default) takes precedence over row_wise
    flat = slerp_formula(0.5, m0.ravel(), m1.ravel()).reshape(2, 2)
    np.testing.assert_allclose(run("nuslerp", [m0, m1]), flat, rtol=1e-6)
    np.testing.assert_allclose(run("nuslerp", [m0, m1], nuslerp_row_wise=True), flat, rtol=1e-6)


def test_nuslerp_modes_random():
    a, b = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    t = 0.8
    rows = np.stack([[slerp_formula(t, a[i, j], b[i, j]) for j in range(4)] for i in range(3)])
    cols = np.empty_like(a)
    for j in range(4):
        for k in range(5):
            cols[:, j, k] = slerp_formula(t, a[:, j, k], b[:, j, k])
    np.testing.assert_allclose(run("nuslerp", [a, b], weights=[1, 4], nuslerp_flatten=False), rows, atol=1e-5)
    np.testing.assert_allclose(
        run("nuslerp", [a, b], weights=[1, 4], nuslerp_flatten=False, nuslerp_row_wise=True), cols, atol=1e-5
    )
    v0, v1 = rng.standard_normal(9), rng.standard_normal(9)  # a 1-D tensor is one vector in every mode
    for mode in ({}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}):
        np.testing.assert_allclose(run("nuslerp", [v0, v1], weights=[1, 4], **mode), slerp_formula(t, v0, v1), atol=1e-5)


def test_nuslerp_base_and_colinear():
    base = rng.standard_normal(10)
    d0, d1 = rng.standard_normal(10), rng.standard_normal(10)
    np.testing.assert_allclose(
        run("nuslerp", [base + d0, base + d1], base, weights=[1, 2]), base + slerp_formula(2 / 3, d0, d1), atol=1e-5
    )
    a = np.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(run("nuslerp", [a, 4 * a], weights=[3, 1]), 0.75 * a + a, rtol=1e-6)  # parallel: lerp
    e = np.array([0.0, -2.0, 0.0])
    np.testing.assert_allclose(run("nuslerp", [e, -e], weights=[3, 1]), 0.5 * e, rtol=1e-6)  # antiparallel: lerp
    # ... but only when cos θ rounds to exactly −1 in float32, as in mergekit; otherwise the spherical branch
    # runs at θ ≈ π − 3e-4 and gives about its limit cos(tπ)·a (here cos(π/4)·a) instead of (1 − 2t)·a
    out = run("nuslerp", [a, -a], weights=[3, 1])
    assert np.allclose(out, 0.5 * a, rtol=1e-6) or np.allclose(out, math.cos(math.pi / 4) * a, rtol=1e-3)
    # a zero tensor (norm below the 1e-7 floor) is left as is: cos θ = 0, θ = π/2
    np.testing.assert_allclose(run("nuslerp", [np.zeros(3), a], weights=[0.7, 0.3]), math.sin(0.15 * math.pi) * a, rtol=1e-6)


def test_nuslerp_params():
    P = OPERATORS["nuslerp"].params
    p = P()
    assert p.weights is None and p.nuslerp_flatten is True and p.nuslerp_row_wise is False
    for bad in ({"weights": [float("inf"), 1.0]}, {"t": 0.5}, {"row_wise": True}):
        with pytest.raises(ValidationError):
            P(**bad)


# ---------------------------------------------------------------- model_stock


def directions_with_cos(c, n_dims=5, scales=(2.0, 3.0), rotate=True):
    """Two vectors with cosine c (optionally rotated into a random frame)."""
    v0 = np.zeros(n_dims)
    v0[0] = 1
    v1 = np.zeros(n_dims)
    v1[0], v1[1] = c, math.sqrt(1 - c * c)
    if rotate:
        q, _ = np.linalg.qr(rng.standard_normal((n_dims, n_dims)))
        v0, v1 = q @ v0, q @ v1
    return scales[0] * v0, scales[1] * v1


@pytest.mark.parametrize("c", [0.6, 0.9, 0.2, -0.5])
def test_model_stock_ratio_from_angle_two_models(c):
    base = rng.standard_normal(5)
    d0, d1 = directions_with_cos(c)
    t = 2 * c / (1 + c)  # N = 2: t = 2cosθ/(1 + cosθ), not clamped (c = −0.5 gives t = −2)
    xs = [base + d0, base + d1]
    expected = t * (xs[0] + xs[1]) / 2 + (1 - t) * base
    np.testing.assert_allclose(run("model_stock", xs, base), expected, atol=1e-5)


def test_model_stock_three_models_by_hand():
    # unit task vectors with pairwise cos ½: t = 3·½ / (1 + 2·½) = ¾
    d = [np.array([1.0, 0, 0]), np.array([0.5, math.sqrt(3) / 2, 0]), np.array([0.5, math.sqrt(3) / 6, math.sqrt(2 / 3)])]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.dot(d[i], d[j]) == pytest.approx(0.5)
    base = np.array([1.0, 2.0, 3.0])
    xs = [base + s * v for s, v in zip((1.0, 2.0, 4.0), d)]  # lengths do not enter the angle
    np.testing.assert_allclose(run("model_stock", xs, base), 0.75 * np.mean(xs, axis=0) + 0.25 * base, rtol=1e-6)
    # orthogonal task vectors: cosθ = 0, t = 0, the base
    np.testing.assert_allclose(run("model_stock", [base + [1, 0, 0], base + [0, 2, 0], base + [0, 0, 3]], base), base, atol=1e-7)
    # identical task vectors: cosθ = 1, t = 1, the mean
    xs = [base + [1, 1, 0]] * 3
    np.testing.assert_allclose(run("model_stock", xs, base), base + [1, 1, 0], rtol=1e-6)
    # mixed pairwise cosines: the mean of the three
    d = [np.array([1.0, 0, 0]), np.array([0.0, 1, 0]), np.array([1.0, 1, 0]) / math.sqrt(2)]
    c = (0 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 3
    t = 3 * c / (1 + 2 * c)
    xs = [base + v for v in d]
    np.testing.assert_allclose(run("model_stock", xs, base), t * np.mean(xs, axis=0) + (1 - t) * base, rtol=1e-6)


def test_model_stock_singular_and_zero_task_vectors():
    base = np.array([1.0, -1.0, 0.5])
    d = np.array([0.3, 0.2, -0.1])
    # opposite task vectors: 1 + cosθ = 0, no finite ratio: the base
    np.testing.assert_allclose(run("model_stock", [base + d, base - d], base), base, atol=1e-7)
    # a zero task vector: its pairs count cosθ = 0 (the norm product is floored at 1e-6)
    xs = [base, base + d, base + 2 * d]  # pair cosines 0, 0, 1 → cosθ = ⅓, t = 3·⅓/(1 + 2·⅓) = 3/5
    np.testing.assert_allclose(run("model_stock", xs, base), 0.6 * np.mean(xs, axis=0) + 0.4 * base, rtol=1e-6)


def test_model_stock_filter_wise():
    base = rng.standard_normal((2, 5))
    a0, a1 = directions_with_cos(0.6)  # row 0: cos 0.6 → t = 0.75
    b0, b1 = directions_with_cos(0.0)  # row 1: orthogonal → t = 0
    xs = [base + np.stack([a0, b0]), base + np.stack([a1, b1])]
    mean = (xs[0] + xs[1]) / 2
    expected = np.stack([0.75 * mean[0] + 0.25 * base[0], base[1]])
    np.testing.assert_allclose(run("model_stock", xs, base, filter_wise=True), expected, atol=1e-5)
    # per tensor: one cosine over the flattened task vectors
    d0, d1 = (xs[0] - base).ravel(), (xs[1] - base).ravel()
    c = np.dot(d0, d1) / np.linalg.norm(d0) / np.linalg.norm(d1)
    t = 2 * c / (1 + c)
    np.testing.assert_allclose(run("model_stock", xs, base), t * mean + (1 - t) * base, atol=1e-5)
    # a 1-D tensor is one vector either way
    v = [rng.standard_normal(6) for _ in range(3)]
    np.testing.assert_allclose(run("model_stock", v[1:], v[0], filter_wise=True), run("model_stock", v[1:], v[0]), atol=1e-6)


def test_model_stock_permutation_invariance():
    base = rng.standard_normal((3, 4))
    shared = rng.standard_normal((3, 4))
    xs = [base + shared + 0.5 * rng.standard_normal((3, 4)) for _ in range(4)]
    for fw in (False, True):
        ref = run("model_stock", xs, base, filter_wise=fw)
        np.testing.assert_allclose(run("model_stock", xs[::-1], base, filter_wise=fw), ref, atol=1e-6)
        np.testing.assert_allclose(run("model_stock", [xs[2], xs[0], xs[3], xs[1]], base, filter_wise=fw), ref, atol=1e-6)


def test_model_stock_params():
    P = OPERATORS["model_stock"].params
    assert P().filter_wise is False
    for bad in ({"filter_wise": [1]}, {"filterwise": True}):
        with pytest.raises(ValidationError):
            P(**bad)


# ---------------------------------------------------------------- arcee_fusion


def arcee_fusion_formula(x, base):
    """Importance |x − b|·KL(softmax(x) ‖ softmax(b)) per row; keep x where importance >= Q₂ + 1.5·IQR."""
    x, base = np.asarray(x, dtype=np.float64), np.asarray(base, dtype=np.float64)

    def softmax(v):
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(x) + 1e-8, softmax(base) + 1e-8
    kl = np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    s = np.abs(x - base) * kl
    srt = np.sort(s.ravel())
    m = srt.size - 1
    tau = srt[m // 2] + 1.5 * (srt[(3 * m) // 4] - srt[m // 4])
    return np.where(s >= tau, x, base), s, tau


def test_arcee_fusion_hand_case_1d():
    # one row: the importance is |d|·KL with one KL > 0, so the mask is |d| >= Q₂ + 1.5·IQR of |d|.
    # n = 9: quartiles at sorted indices 2, 4, 6 → 0, 0.1, 0.1 → τ = 0.1 + 0.15 = 0.25·KL: only the outlier
    base = np.zeros(9)
    d = np.array([0.0, 0.1, 0.0, -0.1, 2.0, 0.0, 0.1, -0.1, 0.0])
    expected = np.zeros(9)
    expected[4] = 2.0
    np.testing.assert_allclose(run("arcee_fusion", [base + d], base), expected)
    # shifting both by a constant changes neither softmax nor |d|
    np.testing.assert_allclose(run("arcee_fusion", [base + d + 3], base + 3), expected + 3, rtol=1e-6)


def test_arcee_fusion_hand_case_rows_weighted_by_kl():
    # row 0 moves every entry by 0.3: softmax unchanged, KL = 0, importance 0 though |d| is large;
    # row 1 moves one entry by 2 and three by 0.1: KL₁ > 0.
    base = np.zeros((2, 4))
    x = np.array([[0.3, 0.3, 0.3, 0.3], [2.0, 0.1, 0.1, 0.1]])
    # sorted importance: 0,0,0,0, .1K, .1K, .1K, 2K; n = 8 → indices 1, 3, 5 → 0, 0, .1K → τ = .15K
    expected = np.array([[0.0, 0, 0, 0], [2.0, 0, 0, 0]])
    np.testing.assert_allclose(run("arcee_fusion", [x], base), expected)
    ref, _, _ = arcee_fusion_formula(x, base)
    np.testing.assert_allclose(ref, expected)


def test_arcee_fusion_matches_formula_random():
    base = f32(rng.standard_normal((16, 32)))
    x = f32(base + 0.05 * rng.standard_normal((16, 32)) + 0.5 * (rng.random((16, 32)) < 0.05))
    expected, s, tau = arcee_fusion_formula(x, base)
    assert np.min(np.abs(s - tau)) > 1e-6 * tau  # no entry sits on the threshold
    out = run("arcee_fusion", [x], base)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    kept = np.isclose(out, x) & ~np.isclose(x, base)
    assert 0 < kept.sum() < x.size / 2
    np.testing.assert_array_equal(run("arcee_fusion", [base], base), base)  # nothing changed: the base


def test_arcee_fusion_subsamples_large_tensors_by_seed():
    base = torch.randn(1_000_100, generator=torch.Generator().manual_seed(0))
    x = base + 0.01 * torch.randn(1_000_100, generator=torch.Generator().manual_seed(1))
    op = OPERATORS["arcee_fusion"]

    def merged(seed, gen_seed):
        return call_merge(op, [x], op.params(seed=seed), base, generator=torch.Generator().manual_seed(gen_seed))

    a, b, c = merged(0, 7), merged(0, 7), merged(0, 8)
    assert torch.equal(a, b)  # same generator, same result
    for out in (a, c):  # every entry is the base's or the model's
        assert bool(((out == base) | (out == x)).all())
    # different draws move the threshold a little: the masks differ in few entries
    differ = int((a != c).sum())
    assert 0 < differ < 1000
    exact, _, _ = arcee_fusion_formula(x.numpy()[None, :], base.numpy()[None, :])  # exact quartiles
    assert int((a.numpy() != exact[0].astype(np.float32)).sum()) < 1000


def test_arcee_fusion_params():
    P = OPERATORS["arcee_fusion"].params
    assert P().seed == 0
    for bad in ({"seed": -1}, {"seed": 1.5}, {"t": 0.5}):
        with pytest.raises(ValidationError):
            P(**bad)


# ---------------------------------------------------------------- nearswap


def test_nearswap_hand_case():
    base = np.array([0.0, 0.0, 0.0, 0.0, 1.0])
    x = np.array([0.005, 0.02, -0.1, 0.0, 1.0000001])
    # w = clamp(t/|d|, 0, 1) with t = 0.01: 1 (2 → 1), 0.5, 0.1, 1 (|d| floored at 1e-6: 1e4 → 1), 1
    expected = np.array([0.005, 0.01, -0.01, 0.0, f32(1.0000001)])
    np.testing.assert_allclose(run("nearswap", [x], base, t=0.01), expected, rtol=1e-6, atol=1e-9)


def test_nearswap_closed_form_clip():
    # w·x + (1 − w)·b = b + sign(d)·min(|d|, t) wherever |d| >= 1e-6
    base = f32(rng.standard_normal((8, 9)))
    x = f32(base + 0.05 * rng.standard_normal((8, 9)))
    for t in (1e-3, 0.02, 0.5):
        np.testing.assert_allclose(run("nearswap", [x], base, t=t), base + np.clip(x - base, -t, t), atol=1e-6)
    np.testing.assert_allclose(run("nearswap", [x], base, t=10.0), x, atol=1e-6)  # t past every |d|: the model


def test_nearswap_params():
    P = OPERATORS["nearswap"].params
    for bad in ({}, {"t": 0.0}, {"t": -0.1}, {"t": float("inf")}, {"t": 0.1, "weights": [1.0]}):
        with pytest.raises(ValidationError):
            P(**bad)
    assert P(t=1e-4).t == 1e-4
