"""Fisher-weighted merging: the fisher_merge operator (Matena & Raffel 2022) and karcher's diagonal-Fisher
preconditioning (`karcher(..., fisher = [...])`), against independent statements of their math, then end
to end through the compiler with Fisher checkpoints written on the fly."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from mgc.api import compile_recipe, run as run_recipe
from mgc.core.errors import CheckpointError, MgcError, RecipeTypeError
from conftest import call_merge
from mgc.stdlib import OPERATORS
from conftest import load_folder

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
PRECISE = {"max_iter": 100, "tol": 1e-12}

rng = np.random.default_rng(1234)


def t32(v) -> torch.Tensor:
    return torch.as_tensor(np.asarray(v, dtype=np.float32))


def run(name, tensors, fisher=None, **params):
    op = OPERATORS[name]
    ts = [t32(t) for t in tensors]
    fs = None if fisher is None else [t32(f) for f in fisher]
    extra = {name: fs for name in op.model_params}  # as the runtime passes it: None when not given
    out = call_merge(op, ts, op.params(**params), None, **extra)
    assert fisher is None or extra
    assert out.dtype == torch.float32 and out.shape == ts[0].shape
    return out.numpy().astype(np.float64)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def angle(a, b) -> float:
    return math.acos(float(np.clip(np.dot(unit(a), unit(b)), -1.0, 1.0)))


def fisher_ref(xs, fs, w, eps):
    """Matena & Raffel's diagonal Fisher average with every Fᵢ raised by eps, in float64."""
    alpha = np.asarray(w, dtype=np.float64) / np.sum(w)
    num = sum(a * (np.asarray(f, np.float64) + eps) * np.asarray(x, np.float64) for a, x, f in zip(alpha, xs, fs))
    den = sum(a * (np.asarray(f, np.float64) + eps) for a, f in zip(alpha, fs))
    return num / den


def karcher_fisher_ref(xs, fs, w=None, max_iter=10, tol=1e-5):
    """The documented Fisher-preconditioned iteration, one model at a time in float64:
    Wᵢ(j) = αᵢFᵢ(j)/Σₖ αₖFₖ(j) (αᵢ where that is 0), T = P_u(Σ Wᵢ ⊙ Log_u(uᵢ)), u ← Exp_u(T)."""
    xs = [np.asarray(x, np.float64).ravel() for x in xs]
    fs = [np.asarray(f, np.float64).ravel() for f in fs]
    w = np.ones(len(xs)) if w is None else np.asarray(w, np.float64)
    alpha = w / w.sum()
    norms = np.array([np.linalg.norm(x) for x in xs])
    scale = float(alpha @ norms)
    a = np.where(norms > 1e-8, alpha, 0.0)
    a = a / a.sum()
    units = [x / n if n > 1e-8 else np.zeros_like(x) for x, n in zip(xs, norms)]
    weighted = np.array([ai * f for ai, f in zip(a, fs)])
    total = weighted.sum(axis=0)
    W = np.where(total > 0, weighted / np.where(total > 0, total, 1.0), a[:, None])
    u = unit(sum(Wi * ui for Wi, ui in zip(W, units)))
    for _ in range(max_iter):
        V = np.zeros_like(u)
        for Wi, ui in zip(W, units):
            c = float(np.clip(np.dot(u, ui), -1.0, 1.0))
            th = math.acos(c)
            ratio = 1.0 if th == 0 else th / math.sin(th)
            V += Wi * ratio * (ui - c * u)
        T = V - np.dot(V, u) * u
        nT = np.linalg.norm(T)
        if nT < tol:
            break
        u = unit(math.cos(nT) * u + math.sin(nT) * T / nT)
    return scale * u


def plain_karcher_before_fisher(tensors, weights=None, max_iter=10, tol=1e-5):
    """karcher.merge as it was before `fisher` was added (verbatim math): the regression oracle for fisher=None."""
    n = len(tensors)
    if n == 1:
        return tensors[0].clone()
    x = torch.empty((n, tensors[0].numel()), dtype=torch.float64)
    for row, t in zip(x, tensors):
        row.copy_(t.reshape(-1))
    w = torch.tensor(weights or [1.0] * n, dtype=torch.float64)
    alpha = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=1)
    scale = alpha @ norms
    valid = norms > 1e-8
    units = x.div_(torch.where(valid, norms, 1.0)[:, None])
    a = torch.where(valid, alpha, 0.0)
    a_sum = a.sum()
    if not a_sum > 0:
        return torch.zeros_like(tensors[0])
    a = a / a_sum
    u = a @ units
    u_norm = torch.linalg.vector_norm(u)
    if u_norm < 1e-8:
        u = units[int(valid.nonzero()[0])].clone()
    else:
        u = u / u_norm
    for _ in range(max_iter):
        cos = (units @ u).clamp_(-1.0, 1.0)
        theta = torch.arccos(cos)
        sinc = torch.sinc(theta / math.pi)
        coef = torch.where(sinc > 1e-12, a / sinc, 0.0)
        tangent = coef @ units - (coef @ cos) * u
        t_norm = torch.linalg.vector_norm(tangent)
        if t_norm < tol:
            break
        u = torch.cos(t_norm) * u + torch.sin(t_norm) * (tangent / t_norm)
        u = u / torch.linalg.vector_norm(u)
    return (scale * u).reshape(tensors[0].shape).to(torch.float32)


# ---------------------------------------------------------------- registry


def test_registry_and_metadata():
    op = OPERATORS["fisher_merge"]
    assert op.name == "fisher_merge" and op.doc and "2111.09832" in op.reference
    assert op.model_params == ("fisher",) and op.per_model == ("weights",) and op.base == "none"
    assert op.min_models == 1 and op.max_models is None
    assert set(op.params.model_fields) == {"weights", "eps"} and op.params().eps == 1e-8
    assert OPERATORS["karcher"].model_params == ("fisher",)
    assert set(OPERATORS["karcher"].params.model_fields) == {"weights", "max_iter", "tol"}  # unchanged


@pytest.mark.parametrize("name", ["fisher_merge", "karcher"])
def test_shape_dtype_and_inputs_untouched(name):
    xs = [torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float32) for _ in range(3)]
    fs = [torch.tensor(rng.random((3, 4)), dtype=torch.float32) for _ in range(3)]
    before = [t.clone() for t in xs + fs]
    op = OPERATORS[name]
    out = call_merge(op, xs, op.params(), None, fisher=fs)
    assert out.dtype == torch.float32 and out.shape == (3, 4) and torch.isfinite(out).all()
    assert all(torch.equal(t, b) for t, b in zip(xs + fs, before))
    assert all(out is not t for t in xs + fs)


# ---------------------------------------------------------------- fisher_merge


def test_fisher_merge_hand_case():
    a, b = [1.0, 2.0, 3.0], [3.0, 6.0, -1.0]
    fa, fb = [1.0, 0.0, 2.0], [3.0, 1.0, 0.0]
    # α = (½, ½): (½·1·1 + ½·3·3)/(½ + 3/2) = 2.5; only b has Fisher in entry 1 → 6; only a in entry 2 → 3
    np.testing.assert_allclose(run("fisher_merge", [a, b], [fa, fb], eps=0.0), [2.5, 6.0, 3.0], rtol=1e-6)
    # α = (¼, ¾): (¼·1 + ¾·9)/(¼ + 9/4) = 7/2.5 = 2.8
    np.testing.assert_allclose(run("fisher_merge", [a, b], [fa, fb], weights=[1, 3], eps=0.0), [2.8, 6.0, 3.0], rtol=1e-6)
    # the default eps = 1e-8 is invisible at this Fisher scale
    np.testing.assert_allclose(run("fisher_merge", [a, b], [fa, fb]), [2.5, 6.0, 3.0], rtol=1e-6)
    # eps = ½ raises every Fisher by ½: entry 0 (1.5·1 + 3.5·3)/5 = 2.4, entry 1 (½·2 + 1.5·6)/2 = 5,
    # entry 2 (2.5·3 − ½)/3 = 7/3
    np.testing.assert_allclose(run("fisher_merge", [a, b], [fa, fb], eps=0.5), [2.4, 5.0, 7 / 3], rtol=1e-6)


def test_fisher_merge_matches_formula_random():
    xs = [rng.standard_normal(50) for _ in range(4)]
    fs = [rng.random(50) ** 3 for _ in range(4)]
    w = [0.5, 1.0, 2.0, 0.25]
    for eps in (0.0, 1e-8, 0.1):
        np.testing.assert_allclose(run("fisher_merge", xs, fs, weights=w, eps=eps), fisher_ref(xs, fs, w, eps),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("varying", [False, True])
def test_fisher_merge_equal_fishers_is_weighted_linear_mean(varying):
    xs = [rng.standard_normal((6, 5)) for _ in range(3)]
    f = rng.random((6, 5)) * 10 + 0.1 if varying else np.full((6, 5), 0.37)
    w = [1.0, 2.0, 0.5]
    out = run("fisher_merge", xs, [f, f, f], weights=w)
    np.testing.assert_allclose(out, run("linear", xs, weights=w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run("fisher_merge", xs, [f, f, f]), np.mean(xs, axis=0), rtol=1e-6, atol=1e-6)


def test_fisher_merge_zero_fisher_everywhere_is_weighted_mean():
    xs = [rng.standard_normal(20) for _ in range(3)]
    zeros = [np.zeros(20)] * 3
    w = [3.0, 1.0, 1.0]
    for eps in (0.0, 1e-8):  # eps = 0 takes the explicit fallback
        np.testing.assert_allclose(run("fisher_merge", xs, zeros, weights=w, eps=eps), run("linear", xs, weights=w),
                                   rtol=1e-6, atol=1e-6)


def test_fisher_merge_zero_fisher_model_does_not_influence_that_entry():
    a, b, c = (rng.standard_normal(30) for _ in range(3))
    fa, fb, fc = (rng.random(30) + 0.5 for _ in range(3))
    fc[:10] = 0.0  # model c has no Fisher on entries 0..9
    other = 100 * rng.standard_normal(30)  # a very different c
    out1 = run("fisher_merge", [a, b, c], [fa, fb, fc], eps=0.0)
    out2 = run("fisher_merge", [a, b, other], [fa, fb, fc], eps=0.0)
    np.testing.assert_array_equal(out1[:10], out2[:10])
    assert not np.allclose(out1[10:], out2[10:])
    # there it is the Fisher average of a and b alone (weights ⅓ each → equal)
    np.testing.assert_allclose(out1[:10], run("fisher_merge", [a, b], [fa, fb], eps=0.0)[:10], rtol=1e-6, atol=1e-6)
    # with the default eps, c's influence is of order eps/F: negligible
    out3 = run("fisher_merge", [a, b, other], [fa, fb, fc])
    np.testing.assert_allclose(out3[:10], out1[:10], rtol=1e-6, atol=1e-5)


def test_fisher_merge_invariant_to_scaling_all_fishers():
    xs = [rng.standard_normal(40) for _ in range(3)]
    fs = [rng.random(40) + 0.01 for _ in range(3)]
    fs[1][:5] = 0.0
    w = [1.0, 2.0, 3.0]
    ref = run("fisher_merge", xs, fs, weights=w, eps=0.0)
    for c in (1e-3, 7.0, 1e4):
        np.testing.assert_allclose(run("fisher_merge", xs, [c * f for f in fs], weights=w, eps=0.0), ref,
                                   rtol=1e-5, atol=1e-6)
        # the default eps is absolute, but negligible against Fishers of order 1e-5 and up
        np.testing.assert_allclose(run("fisher_merge", xs, [c * f for f in fs], weights=w), ref, rtol=1e-4, atol=1e-4)


def test_fisher_merge_weights_and_single_model():
    a, b = rng.standard_normal(10), rng.standard_normal(10)
    fa, fb = rng.random(10) + 0.1, rng.random(10) + 0.1
    # a zero weight removes the model, whatever its Fisher
    np.testing.assert_allclose(run("fisher_merge", [a, b], [fa, fb], weights=[1, 0]), a, rtol=1e-6, atol=1e-6)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run("fisher_merge", [x], [np.ones((2, 3))]), x)
    # weights scale invariance and permutation invariance
    xs, fs = [a, b, -a], [fa, fb, fa * 2]
    ref = run("fisher_merge", xs, fs, weights=[1, 2, 3])
    np.testing.assert_allclose(run("fisher_merge", xs, fs, weights=[10, 20, 30]), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run("fisher_merge", xs[::-1], fs[::-1], weights=[3, 2, 1]), ref, rtol=1e-6, atol=1e-6)


def test_fisher_merge_validation():
    P = OPERATORS["fisher_merge"].params
    for bad in ({"weights": [-1.0, 2.0]}, {"weights": [0.0, 0.0]}, {"eps": -1e-3}, {"eps": float("inf")},
                {"weights": [1.0, float("nan")]}):
        with pytest.raises(ValidationError):
            P(**bad)
    with pytest.raises(ValidationError, match="positive sum"):
        P(weights=[0.0, 0.0])
    x = [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="needs `fisher"):
        run("fisher_merge", x)
    with pytest.raises(ValueError, match="'fisher' tensor 2 has negative entries"):
        run("fisher_merge", x, [[1.0, 1.0], [1.0, -0.5]])
    with pytest.raises(ValueError, match="'fisher' has 1 tensors for 2 models"):
        run("fisher_merge", x, [[1.0, 1.0]])
    with pytest.raises(ValueError, match="shape"):
        run("fisher_merge", x, [[1.0, 1.0], [1.0, 1.0, 1.0]])


# ---------------------------------------------------------------- karcher with Fisher


def test_karcher_fisher_none_is_unchanged():
    op = OPERATORS["karcher"]
    cases = [
        ([rng.standard_normal((4, 6)) for _ in range(3)], None, {}),
        ([rng.standard_normal(30) * s for s in (1, 2, 3)], [1.0, 1.0, 2.0], PRECISE),
        ([rng.standard_normal(10), np.zeros(10), rng.standard_normal(10)], None, {}),
        ([[1.0, 0.0], [-1.0, 0.0]], None, {}),
        ([np.zeros(4), np.ones(4)], [1.0, 0.0], {}),
        ([rng.standard_normal(7)], None, {}),
    ]
    for xs, w, params in cases:
        ts = [t32(x) for x in xs]
        p = op.params(weights=w, **params)
        expected = plain_karcher_before_fisher(ts, w, **params)
        # The plain path now iterates on the Gram matrix of the units: the same iteration, equal up
        # to float rounding to the dense form it replaced.
        torch.testing.assert_close(call_merge(op, ts, p, None), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(call_merge(op, ts, p, None, fisher=None), call_merge(op, ts, p, None))


@pytest.mark.parametrize("varying", [False, True])
def test_karcher_equal_fishers_is_plain_karcher(varying):
    d = 40
    xs = [rng.standard_normal(d) * s for s in (1.0, 2.0, 0.5)]
    f = (rng.random(d) * 100 + 1e-3) if varying else np.full(d, 2.5)
    if varying:
        f[:4] = 0.0  # columns with no Fisher anywhere fall back to αᵢ as well
    for w, params in ((None, {}), ([1.0, 3.0, 0.5], {}), ([1.0, 3.0, 0.5], PRECISE)):
        np.testing.assert_allclose(run("karcher", xs, [f, f, f], weights=w, **params),
                                   run("karcher", xs, weights=w, **params), atol=1e-6, rtol=1e-6)
    # with a zero-norm source, too
    xs0 = [xs[0], np.zeros(d), xs[1]]
    np.testing.assert_allclose(run("karcher", xs0, [f, f, f]), run("karcher", xs0), atol=1e-6, rtol=1e-6)


def test_karcher_zero_fishers_fall_back_to_plain():
    xs = [rng.standard_normal(25) for _ in range(3)]
    zeros = [np.zeros(25)] * 3
    np.testing.assert_allclose(run("karcher", xs, zeros, weights=[1, 2, 3]), run("karcher", xs, weights=[1, 2, 3]),
                               atol=1e-6, rtol=1e-6)


def test_karcher_fisher_matches_reference_iteration():
    for n, d in ((2, 12), (3, 40), (5, 64)):
        xs = [rng.standard_normal(d) + 0.5 for _ in range(n)]
        fs = [rng.random(d) ** 2 for _ in range(n)]
        fs[0][:3] = 0.0
        w = list(rng.random(n) + 0.2)
        for params in ({}, PRECISE, {"max_iter": 1, "tol": 1e-12}, {"max_iter": 3, "tol": 1e-12}):
            np.testing.assert_allclose(run("karcher", xs, fs, weights=w, **params),
                                       karcher_fisher_ref(xs, fs, w, **params), atol=1e-6, rtol=1e-5)


def test_karcher_fisher_one_step_by_hand():
    # x = (2e1, 3e2, e3): units eᵢ; Fishers: model 1 only cares about entry 1, model 2 about 2 and 3 equally, model 3 about 3.
    xs = [[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]]
    fs = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    alpha = np.array([0.25, 0.25, 0.5])
    # Wᵢ(j) = αᵢFᵢ(j)/Σₖ αₖFₖ(j): column 1 → (1,0,0), column 2 → (0,1,0), column 3 → (0, ⅓, ⅔)
    W = np.array([[1, 0, 0], [0, 1, 1 / 3], [0, 0, 2 / 3]], dtype=np.float64)
    u0 = unit(sum(W[i] * np.eye(3)[i] for i in range(3)))  # (1, 1, ⅔)/‖·‖
    V = np.zeros(3)
    for i in range(3):
        c = u0[i]
        th = math.acos(c)
        V += W[i] * th / math.sin(th) * (np.eye(3)[i] - c * u0)
    T = V - np.dot(V, u0) * u0
    nT = np.linalg.norm(T)
    u1 = unit(math.cos(nT) * u0 + math.sin(nT) * T / nT)
    expected = float(alpha @ [2.0, 3.0, 1.0]) * u1
    np.testing.assert_allclose(run("karcher", xs, fs, weights=[1, 1, 2], max_iter=1, tol=1e-12), expected, atol=1e-6)


def test_karcher_fisher_fixed_point_and_scale():
    d = 60
    xs = [rng.standard_normal(d) for _ in range(4)]
    fs = [rng.random(d) ** 4 for _ in range(4)]
    w = np.array([1.0, 2.0, 0.5, 1.5])
    alpha = w / w.sum()
    out = run("karcher", xs, fs, weights=list(w), **PRECISE)
    assert np.linalg.norm(out) == pytest.approx(float(alpha @ [np.linalg.norm(x) for x in xs]), rel=1e-6)
    # the preconditioned first-order condition P_u(Σ Wᵢ ⊙ Log_u(uᵢ)) = 0 holds at the result
    u = unit(out)
    weighted = np.array([a * f for a, f in zip(alpha, fs)])
    W = weighted / weighted.sum(axis=0)
    V = np.zeros(d)
    for Wi, x in zip(W, xs):
        ui = unit(x)
        c = np.clip(np.dot(u, ui), -1, 1)
        v = ui - c * u
        V += Wi * math.acos(c) * v / np.linalg.norm(v)
    assert np.linalg.norm(V - np.dot(V, u) * u) < 1e-6
    # scaling every Fisher by one constant changes nothing
    for c in (1e-6, 1e3):
        np.testing.assert_allclose(run("karcher", xs, [c * f for f in fs], weights=list(w), **PRECISE), out,
                                   atol=1e-6, rtol=1e-6)


def test_karcher_fisher_flat_limit_is_fisher_average_of_directions():
    # nearby directions: the fixed point u ∝ Σ Wᵢ ⊙ uᵢ up to second order in the spread
    d = 50
    center = unit(rng.standard_normal(d))
    xs = [(1 + 0.1 * k) * unit(center + 1e-3 * rng.standard_normal(d)) for k in range(3)]
    fs = [rng.random(d) + 0.05 for _ in range(3)]
    out = run("karcher", xs, fs, **PRECISE)
    flat = unit(fisher_ref([unit(x) for x in xs], fs, [1, 1, 1], 0.0))
    scale = np.mean([np.linalg.norm(x) for x in xs])
    np.testing.assert_allclose(out, scale * flat, atol=1e-6)


def test_karcher_high_fisher_pulls_toward_that_model():
    d = 40
    a, b, c = (rng.standard_normal(d) for _ in range(3))
    S = np.arange(12)  # the coordinates where model a is sensitive
    fa = np.ones(d)
    fa[S] = 1e6
    ones = np.ones(d)
    plain = run("karcher", [a, b, c], **PRECISE)
    pre = run("karcher", [a, b, c], [fa, ones, ones], **PRECISE)
    assert angle(pre[S], a[S]) < 0.5 * angle(plain[S], a[S])
    assert angle(pre[S], a[S]) < 0.05  # a's high-Fisher block is essentially a's direction
    # and the other coordinates stay a genuine mixture, not a copy of a
    rest = np.setdiff1d(np.arange(d), S)
    assert angle(pre[rest], a[rest]) > 0.2
    # the same two-model comparison against slerp-like plain karcher
    pre2 = run("karcher", [a, b], [fa, ones])
    plain2 = run("karcher", [a, b])
    assert angle(pre2[S], a[S]) < angle(plain2[S], a[S])
    assert angle(pre2[S], b[S]) > angle(plain2[S], b[S])


def test_karcher_fisher_single_model_and_validation():
    x = rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(run("karcher", [x], [np.ones((3, 5))]), x)
    xs = [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="'fisher' tensor 1 has negative entries"):
        run("karcher", xs, [[-1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="'fisher' has 3 tensors for 2 models"):
        run("karcher", xs, [[1.0, 1.0]] * 3)
    P = OPERATORS["karcher"].params
    for bad in ({"weights": [-1.0, 2.0]}, {"weights": [0.0, 0.0]}):
        with pytest.raises(ValidationError):
            P(**bad)
    # antipodal directions stay finite with a Fisher too
    out = run("karcher", [[1.0, 0.0], [-1.0, 0.0]], [[1.0, 2.0], [3.0, 0.0]])
    assert np.all(np.isfinite(out)) and np.linalg.norm(out) == pytest.approx(1.0)


# ---------------------------------------------------------------- end to end


def tensor_specs() -> dict[str, list[int]]:
    with safe_open(str(MODELS / "code" / "model.safetensors"), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def write_fisher(folder: Path, seed: int, *, negative: str | None = None, drop: str | None = None) -> Path:
    """A Fisher checkpoint for the example models: the same names and shapes, float32 squares of random values."""
    folder.mkdir(parents=True)
    shutil.copy(MODELS / "code" / "config.json", folder / "config.json")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_specs().items():
        if name == drop:
            continue
        t = torch.randn(shape, generator=g) ** 2
        if name == negative:
            t.view(-1)[0] = -1.0
        tensors[name] = t.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder



def header(**fishers: Path) -> str:
    lines = [f'{m} = model("{MODELS / m}")' for m in ("code", "math")]
    lines += [f'{name} = model("{path}")' for name, path in fishers.items()]
    return "\n".join(lines) + "\n"


def merged(tmp_path: Path, text: str, name: str) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    run_recipe(tmp_path / f"{name}.merge", text=text, output=out, device="cpu")
    assert (out / "config.json").is_file()
    return load_folder(out)


def assert_bf16_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.bfloat16, name
        # both sides are float32 results rounded to bf16: at most one bf16 step apart
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=2**-7, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def fishers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fishers")
    return {
        "f1": write_fisher(root / "f1", 1),
        "f1_copy": write_fisher(root / "f1_copy", 1),  # the same values in another folder
        "f2": write_fisher(root / "f2", 2),
    }


def test_end_to_end_equal_fishers_match_linear_and_karcher(tmp_path, fishers):
    h = header(fc=fishers["f1"], fm=fishers["f1_copy"])
    fm_out = merged(tmp_path, h + 'save fisher_merge(code, math, fisher = [fc, fm]) to "o"\n', "fm")
    lin_out = merged(tmp_path, h + 'save linear(code, math) to "o"\n', "lin")
    assert_bf16_close(fm_out, lin_out)
    kf_out = merged(tmp_path, h + 'save karcher(code, math, fisher = [fc, fm]) to "o"\n', "kf")
    k_out = merged(tmp_path, h + 'save karcher(code, math) to "o"\n', "k")
    assert_bf16_close(kf_out, k_out)
    # one Fisher model given for both inputs works the same
    same = merged(tmp_path, h + 'save karcher(code, math, weights = [2, 1], fisher = [fc, fc]) to "o"\n', "same")
    assert_bf16_close(same, merged(tmp_path, h + 'save karcher(code, math, weights = [2, 1]) to "o"\n', "kw"))


def test_end_to_end_distinct_fishers_follow_the_formulas(tmp_path, fishers):
    h = header(fc=fishers["f1"], fm=fishers["f2"])
    code, math_ = load_folder(MODELS / "code"), load_folder(MODELS / "math")
    fc, fm = load_folder(fishers["f1"]), load_folder(fishers["f2"])
    fm_out = merged(tmp_path, h + 'save fisher_merge(code, math, weights = [1, 3], fisher = [fc, fm]) to "o"\n', "fm")
    kf_out = merged(tmp_path, h + 'save karcher(code, math, fisher = [fc, fm]) to "o"\n', "kf")
    k_out = merged(tmp_path, h + 'save karcher(code, math) to "o"\n', "k")
    differs = 0
    for name in code:
        xs = [code[name].double().numpy(), math_[name].double().numpy()]
        fs = [fc[name].double().numpy(), fm[name].double().numpy()]
        expected = torch.tensor(fisher_ref(xs, fs, [1, 3], 1e-8)).float().to(torch.bfloat16)
        torch.testing.assert_close(fm_out[name].float(), expected.float(), rtol=2**-7, atol=1e-6, msg=name)
        ref = torch.tensor(karcher_fisher_ref(xs, fs).reshape(xs[0].shape)).float().to(torch.bfloat16)
        torch.testing.assert_close(kf_out[name].float(), ref.float(), rtol=2**-7, atol=1e-5, msg=name)
        differs += not torch.equal(kf_out[name], k_out[name])
    assert differs > len(code) // 2  # unequal Fishers do change karcher


def recipe_error(tmp_path: Path, text: str) -> MgcError:
    with pytest.raises(MgcError) as info:
        compile_recipe(tmp_path / "r.merge", text=text)
    return info.value


def test_end_to_end_wrong_number_of_fisher_models_is_located(tmp_path, fishers):
    h = header(fc=fishers["f1"], fm=fishers["f2"])
    line = h.count("\n") + 1
    body = "x = karcher(code, math, fisher = [fc])\nsave x to \"o\"\n"
    err = recipe_error(tmp_path, h + body)
    assert isinstance(err, RecipeTypeError), err.render()
    assert "'fisher' has 1 model for 2 input models" in err.message
    assert (err.span.line, err.span.col) == (line, body.index("[fc]") + 1), err.render()
    assert "one fisher model per input model" in err.hint
    body = "x = fisher_merge(code, math, fisher = [fc, fm, fc])\nsave x to \"o\"\n"
    err = recipe_error(tmp_path, h + body)
    assert isinstance(err, RecipeTypeError) and "'fisher' has 3 models for 2 input models" in err.message
    assert (err.span.line, err.span.col) == (line, body.index("[fc, fm, fc]") + 1), err.render()


def test_end_to_end_fisher_checkpoint_mismatch_is_located(tmp_path, fishers):
    missing = write_fisher(tmp_path / "missing", 3, drop="model.layers.0.mlp.up_proj.weight")
    h = header(fc=fishers["f1"], fx=missing)
    body = "x = fisher_merge(code, math, fisher = [fc, fx])\nsave x to \"o\"\n"
    err = recipe_error(tmp_path, h + body)
    assert isinstance(err, CheckpointError), err.render()
    assert "model.layers.0.mlp.up_proj.weight" in err.message and err.span is not None


def test_end_to_end_negative_fisher_fails_at_run_time(tmp_path, fishers):
    bad = write_fisher(tmp_path / "bad", 4, negative="model.norm.weight")
    h = header(fc=fishers["f1"], fb=bad)
    with pytest.raises(MgcError, match="negative entries") as info:
        run_recipe(tmp_path / "r.merge", text=h + 'save fisher_merge(code, math, fisher = [fc, fb]) to "o"\n',
                   output=tmp_path / "out", device="cpu")
    assert "model.norm.weight" in info.value.message and info.value.span is not None
    assert not (tmp_path / "out").exists()


def test_end_to_end_fisher_merge_without_fisher_is_an_error(tmp_path):
    text = header() + 'save fisher_merge(code, math) to "o"\n'
    with pytest.raises(MgcError, match="fisher") as info:
        run_recipe(tmp_path / "r.merge", text=text, output=tmp_path / "out", device="cpu")
    assert info.value.span is not None, info.value.render()
    assert not (tmp_path / "out").exists()
