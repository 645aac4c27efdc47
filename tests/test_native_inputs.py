"""Operators that take their inputs as stored (``runs="stored"``): linear, slerp, karcher and ties read
bf16/fp16 tensors, widen them slice by slice and fill an ``out`` tensor in the saved dtype.

Each claim is checked against an independent statement of the math: bit for bit where the module claims
the same bits as the one-piece float32 computation (linear, ties, linear_combination, the magnitude trim), to a
float64 reference where the math is a closed form or a fixed point (slerp, karcher, gram). The slice size
is monkeypatched to 1000 entries so every tensor spans many slices and a partial last one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mgc.runtime.apply as ap
import mgc.runtime.execute as ex
import mgc.stdlib.karcher as karcher
import mgc.stdlib.linear as linear
import mgc.stdlib.slerp as slerp
import mgc.stdlib.slices as slices
import mgc.stdlib.sparsify as sp
import mgc.stdlib.ties as ties
from mgc.api import compile_recipe, run
from mgc.compiler.ir import Apply, Graph, Load, Save
from mgc.runtime.allocator import keep_freed_memory
from conftest import call_merge, without_provenance
from mgc.stdlib import OPERATORS
from mgc.stdlib.operator import MergeContext

ORIGINAL_OPERATORS = dict(OPERATORS)
MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
HEAD = "\n".join(f'{m} = model("{MODELS / m}")' for m in ("base", "code", "math", "prose")) + "\n"
SHAPE = (37, 271)  # 10027 entries: 11 slices of 1000, the last one of 27
SMALL_SLICE = 1000


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of SMALL_SLICE entries (spans() and the slice buffers read SLICE at call time)."""
    monkeypatch.setattr(slices, "SLICE", SMALL_SLICE)
    return SMALL_SLICE


# ---------------------------------------------------------------- helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(shape, seed: int, lo: int = -4, hi: int = 4) -> torch.Tensor:
    """Integers in [lo, hi] / 8 as bf16 (exact): task vectors built from these tie at every magnitude."""
    return (torch.randint(lo, hi + 1, shape, generator=gen(seed)).float() / 8).bfloat16()


def randn(shape, seed: int, dtype=torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen(seed)) * scale).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """max |got − want| <= rel · max |want| (element-wise relative error means nothing near a zero)."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * want.double().abs().max().item(), (err, want.abs().max().item())


# ---------------------------------------------------------------- independent references


def linear_reference(xs, weights, normalize: bool) -> torch.Tensor:
    """Σ wᵢ·xᵢ in float32, each product rounded before it is added, then / Σ wᵢ (float32, summed in order)."""
    w = [torch.tensor(v, dtype=torch.float32) for v in (weights or [1.0] * len(xs))]
    acc = xs[0].float() * w[0]
    for wi, x in zip(w[1:], xs[1:]):
        product = x.float() * wi
        acc = acc + product
    if normalize:
        total = w[0]
        for wi in w[1:]:
            total = total + wi
        acc = acc / total
    return acc


def slerp_reference(x0: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
    """The closed form in float64, θ from the float64 inner product of the widened inputs."""
    a, b = x0.double().reshape(-1), x1.double().reshape(-1)
    cos = float(a @ b) / (float(a.norm()) * float(b.norm()))
    if abs(cos) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(cos)
        out = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
    return out.reshape(x0.shape)


def karcher_two_reference(x1: torch.Tensor, x2: torch.Tensor, w1: float, w2: float) -> torch.Tensor:
    """For two models the weighted Karcher mean of the directions is the point at fraction α₂ along their
    geodesic (d/ds [α₁(sθ)² + α₂((1−s)θ)²] = 0 at s = α₂): slerp of the units at t = w₂/(w₁+w₂), times
    the weighted mean norm α₁‖x₁‖ + α₂‖x₂‖."""
    a1, a2 = w1 / (w1 + w2), w2 / (w1 + w2)
    u1, u2 = (x.double().reshape(-1) / x.double().norm() for x in (x1, x2))
    theta = math.acos(max(-1.0, min(1.0, float(u1 @ u2))))
    u = math.sin(a1 * theta) / math.sin(theta) * u1 + math.sin(a2 * theta) / math.sin(theta) * u2
    scale = a1 * float(x1.double().norm()) + a2 * float(x2.double().norm())
    return (scale * u).reshape(x1.shape)


def karcher_dense_reference(xs, weights, max_iter: int, tol: float) -> torch.Tensor:
    """The fixed point u ← Exp_u(Σ αᵢ·Log_u(uᵢ)) on the dense [N, d] float64 units, zero-norm sources
    dropped from the directions but kept in the norm Σ αᵢ‖xᵢ‖."""
    x = torch.stack([t.double().reshape(-1) for t in xs])
    w = torch.tensor(weights or [1.0] * len(xs), dtype=torch.float64)
    alpha = w / w.sum()
    norms = x.norm(dim=1)
    scale = float(alpha @ norms)
    keep = [i for i in range(len(xs)) if norms[i] > 1e-8]
    units = x[keep] / norms[keep, None]
    a = alpha[keep] / alpha[keep].sum()
    u = (a[:, None] * units).sum(0)
    u = u / u.norm()
    for _ in range(max_iter):
        v = torch.zeros_like(u)
        for ai, ui in zip(a.tolist(), units):
            c = max(-1.0, min(1.0, float(u @ ui)))
            theta = math.acos(c)
            factor = 1.0 if theta == 0 else theta / math.sin(theta)
            v += ai * factor * (ui - c * u)
        tangent = v - float(v @ u) * u
        n = float(tangent.norm())
        if n < tol:
            break
        u = math.cos(n) * u + math.sin(n) * tangent / n
        u = u / u.norm()
    return (scale * u).reshape(xs[0].shape)


def top_k_reference(values: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the k largest, ties broken by lowest position: a stable descending sort."""
    order = torch.sort(values, descending=True, stable=True).indices
    mask = torch.zeros_like(values)
    mask[order[:k]] = 1
    return mask


# ---------------------------------------------------------------- 1. bit identity: linear


LINEAR_CASES = [
    (None, True),
    (None, False),
    ([0.3, 1.7, 0.45], True),
    ([0.7, -0.25, 1.1], True),  # a negative weight
    ([0.7, -0.25, 1.1], False),
    ([-1.3, 2.6, 0.9], False),
]


@pytest.mark.parametrize("weights, normalize", LINEAR_CASES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_fills_out_with_the_bits_of_the_one_piece_float32_reference(small_slices, weights, normalize, out_dtype):
    xs = [randn(SHAPE, seed) for seed in (1, 2, 3)]
    params = linear.Params(weights=weights, normalize=normalize)
    want = linear_reference(xs, weights, normalize)
    out = torch.empty(SHAPE, dtype=out_dtype)
    got = call_merge(linear, xs, params, None, out=out)
    assert got is out
    assert same_bits(got, want.to(out_dtype))

    wide = call_merge(linear, xs, params, None)
    assert wide.dtype == torch.float32 and wide.shape == SHAPE
    assert same_bits(wide, want)


def test_linear_takes_inputs_of_mixed_dtypes(small_slices):
    xs = [randn(SHAPE, 4, torch.bfloat16), randn(SHAPE, 5, torch.float16), randn(SHAPE, 6, torch.float32)]
    params = linear.Params(weights=[0.2, 0.5, 0.3])
    assert same_bits(call_merge(linear, xs, params, None), linear_reference(xs, [0.2, 0.5, 0.3], True))
    out = call_merge(linear, xs, params, None, out=torch.empty(SHAPE, dtype=torch.bfloat16))
    assert same_bits(out, linear_reference(xs, [0.2, 0.5, 0.3], True).bfloat16())


def test_linear_slice_size_does_not_change_the_bits(monkeypatch):
    xs = [randn(SHAPE, seed) for seed in (7, 8)]
    params = linear.Params(weights=[0.35, 0.65])
    results = []
    for size in (SMALL_SLICE, 999, 1 << 18):
        monkeypatch.setattr(slices, "SLICE", size)
        results.append(call_merge(linear, xs, params, None, out=torch.empty(SHAPE, dtype=torch.bfloat16)))
    assert all(same_bits(r, results[0]) for r in results[1:])


# ---------------------------------------------------------------- 1. bit identity: ties


def ties_inputs(n_models: int, seed: int):
    base = grid(SHAPE, seed)
    xs = [(base.float() + grid(SHAPE, seed + 1 + i, -3, 3).float()).bfloat16() for i in range(n_models)]
    return base, xs


TIES_CASES = [
    dict(),
    dict(density=[0.5, 0.5, 0.5]),
    dict(density=[0.2, 0.5, 1.0], weights=[1.0, 0.5, 2.0]),
    dict(density=[0.9, 0.1, 0.37], weights=[0.7, -0.3, 1.1]),
    dict(density=[0.3, 0.6, 0.45], normalize=False),
    dict(density=[0.3, 0.6, 0.45], weights=[1.0, 2.0, 0.5], lambda_=0.6),
    dict(density=[0.3, 0.6, 0.45], normalize=False, lambda_=1.7),
    dict(density=[1.0, 1.0, 1.0], weights=[0.4, 0.4, 0.2]),
    dict(density=[0.5, 0.25, 0.75], rescale=True),
    dict(density=[0.5, 0.25, 1.0], rescale=True, weights=[0.6, 1.2, -0.4], lambda_=0.8, normalize=False),
    dict(density=[0.001, 0.9999, 0.5]),  # a handful kept; all but one kept
]


@pytest.mark.parametrize("kw", TIES_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_ties_matches_merge_deltas_on_float32_copies_bit_for_bit(small_slices, kw):
    base, xs = ties_inputs(3, seed=10)
    params = ties.Params(**kw)
    deltas = [x.float() - base.float() for x in xs]
    # The construction really ties at the cut: many |δ| equal the k-th largest magnitude.
    mags = deltas[0].abs().reshape(-1)
    k = max(1, int(0.5 * mags.numel()))
    assert int((mags == torch.kthvalue(mags, mags.numel() - k + 1).values).sum()) > 100

    want = ties.merge_deltas([d.clone() for d in deltas], params, MergeContext(base=base.float()))
    assert want.dtype == torch.float32

    out = torch.empty(SHAPE, dtype=torch.bfloat16)
    got = call_merge(ties, xs, params, base, out=out)
    assert got is out
    assert same_bits(got, want.bfloat16())

    wide = call_merge(ties, xs, params, base)
    assert wide.dtype == torch.float32
    assert same_bits(wide, want)


def test_ties_with_a_single_model_and_inputs_of_mixed_dtypes(small_slices):
    base, (x,) = ties_inputs(1, seed=20)
    params = ties.Params(density=[0.4], lambda_=0.9)
    want = ties.merge_deltas([x.float() - base.float()], params, MergeContext(base=base.float()))
    assert same_bits(call_merge(ties, [x], params, base, out=torch.empty(SHAPE, dtype=torch.bfloat16)), want.bfloat16())

    base16, xs = base.half(), [x, x.float() * 0.5]  # fp16 base, a bf16 and a float32 model
    params = ties.Params(density=[0.4, 0.6])
    want = ties.merge_deltas([t.float() - base16.float() for t in xs], params, MergeContext(base=base16.float()))
    assert same_bits(call_merge(ties, xs, params, base16), want)
    assert same_bits(call_merge(ties, xs, params, base16, out=torch.empty(SHAPE, dtype=torch.float16)), want.half())


# ---------------------------------------------------------------- 2. slerp and karcher against float64


SLERP_T = [0.0, 0.25, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("t", SLERP_T)
def test_slerp_matches_the_float64_closed_form(small_slices, t):
    x0, x1 = randn(SHAPE, 30), randn(SHAPE, 31, scale=0.3)
    x1 = (x1.float() + 0.4 * x0.float()).bfloat16()  # correlated, θ well inside (0, π)
    cos = float(x0.double().reshape(-1) @ x1.double().reshape(-1)) / (x0.double().norm() * x1.double().norm())
    assert 0.2 < cos < 0.99

    params = slerp.Params(t=t)
    got = call_merge(slerp, [x0, x1], params, None)
    assert got.dtype == torch.float32 and got.shape == SHAPE
    want = slerp_reference(x0, x1, t)
    assert_close_rel(got, want)

    out = call_merge(slerp, [x0, x1], params, None, out=torch.empty(SHAPE, dtype=torch.bfloat16))
    assert same_bits(out, got.bfloat16())


def test_slerp_of_nearly_parallel_tensors_is_the_lerp(small_slices):
    x0 = randn(SHAPE, 32)
    x1 = (x0.float() * 1.5 + randn(SHAPE, 33, torch.float32, scale=1e-3)).bfloat16()
    a, b = x0.double().reshape(-1), x1.double().reshape(-1)
    assert float(a @ b) / float(a.norm() * b.norm()) > 0.9995
    got = call_merge(slerp, [x0, x1], slerp.Params(t=0.3), None)
    assert_close_rel(got, 0.7 * x0.double() + 0.3 * x1.double())


@pytest.mark.parametrize("w1, w2", [(1.0, 1.0), (2.0, 1.0), (0.2, 1.5)])
def test_karcher_of_two_models_is_the_slerp_of_their_directions(small_slices, w1, w2):
    x1 = randn(SHAPE, 40, scale=2.0)
    x2 = (randn(SHAPE, 41, torch.float32, scale=0.5) + 0.3 * x1.float()).bfloat16()
    params = karcher.Params(weights=[w1, w2], max_iter=100, tol=1e-12)
    got = call_merge(karcher, [x1, x2], params, None)
    assert got.dtype == torch.float32
    assert_close_rel(got, karcher_two_reference(x1, x2, w1, w2))

    out = call_merge(karcher, [x1, x2], params, None, out=torch.empty(SHAPE, dtype=torch.bfloat16))
    assert same_bits(out, got.bfloat16())


@pytest.mark.parametrize(
    "weights, max_iter, tol",
    [(None, 10, 1e-5), ([2.0, 1.0, 1.0, 0.5], 10, 1e-5), ([2.0, 1.0, 1.0, 0.5], 200, 1e-13), ([0.0, 1.0, 3.0, 1.0], 3, 1e-5)],
)
def test_karcher_of_several_models_matches_a_dense_float64_fixed_point(small_slices, weights, max_iter, tol):
    shared = randn(SHAPE, 50, torch.float32)
    xs = [(shared * 0.6 + randn(SHAPE, 51 + i, torch.float32, scale=0.8)).to(dtype)
          for i, dtype in enumerate((torch.bfloat16, torch.bfloat16, torch.float16, torch.bfloat16))]
    params = karcher.Params(weights=weights, max_iter=max_iter, tol=tol)
    got = call_merge(karcher, xs, params, None)
    assert_close_rel(got, karcher_dense_reference(xs, weights, max_iter, tol))

    out = call_merge(karcher, xs, params, None, out=torch.empty(SHAPE, dtype=torch.bfloat16))
    assert same_bits(out, got.bfloat16())


def test_karcher_drops_a_zero_model_from_the_directions_but_not_from_the_norm(small_slices):
    xs = [randn(SHAPE, 60), randn(SHAPE, 61), torch.zeros(SHAPE, dtype=torch.bfloat16)]
    params = karcher.Params(weights=[1.0, 2.0, 1.0], max_iter=100, tol=1e-12)
    got = call_merge(karcher, xs, params, None)
    want = karcher_dense_reference(xs, [1.0, 2.0, 1.0], 100, 1e-12)
    assert_close_rel(got, want)
    # and the zero model's weight still counts in the norm: ‖result‖ = (1·‖x₁‖ + 2·‖x₂‖ + 1·0) / 4
    assert math.isclose(float(got.double().norm()), (xs[0].double().norm() + 2 * xs[1].double().norm()).item() / 4,
                        rel_tol=1e-6)


def test_karcher_of_one_model_copies_it_into_out():
    x = randn(SHAPE, 70)
    assert same_bits(call_merge(karcher, [x], karcher.Params(), None), x.float())
    out = call_merge(karcher, [x], karcher.Params(), None, out=torch.empty(SHAPE, dtype=torch.bfloat16))
    assert same_bits(out, x)


# ---------------------------------------------------------------- 3. slices.gram and slices.linear_combination


GRAM_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("size", [None, 333])
def test_gram_is_the_float64_product_of_the_flattened_tensors(small_slices, count, size):
    numel = 10_007  # not a multiple of any slice size used
    shapes = [(numel,), (1, numel), (10_007, 1), (numel,), (numel,)]
    xs = [randn(shapes[i], 80 + i, GRAM_DTYPES[i], scale=1 + i) for i in range(count)]
    g = slices.gram(xs, size)
    assert g.dtype == torch.float64 and g.shape == (count, count)
    x = torch.stack([t.double().reshape(-1) for t in xs])
    want = x @ x.T
    assert torch.allclose(g, want, rtol=1e-12, atol=0)
    assert torch.equal(g, g.T)


def test_gram_of_a_tensor_shorter_than_one_slice(small_slices):
    xs = [randn((7,), 90), randn((7,), 91, torch.float16)]
    x = torch.stack([t.double() for t in xs])
    assert torch.allclose(slices.gram(xs), x @ x.T, rtol=1e-12, atol=0)


def weighted_sum_reference(xs, coefficients, divisor):
    k = [torch.tensor(c, dtype=torch.float32) for c in coefficients]
    acc = xs[0].float() * k[0]
    for ki, x in zip(k[1:], xs[1:]):
        acc = acc + x.float() * ki
    if divisor is not None:
        acc = acc / torch.tensor(divisor, dtype=torch.float32)
    return acc


@pytest.mark.parametrize("divisor", [None, 1.3, -0.7])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float32])
def test_weighted_sum_with_divisor_into_out(small_slices, divisor, out_dtype):
    xs = [randn(SHAPE, 100), randn(SHAPE, 101, torch.float16), randn(SHAPE, 102, torch.float32)]
    coefficients = [0.3, -1.7, 2.25]
    want = weighted_sum_reference(xs, coefficients, divisor)
    out = None if out_dtype is None else torch.empty(SHAPE, dtype=out_dtype)
    got = slices.linear_combination(xs, coefficients, out, divisor=divisor)
    if out is not None:
        assert got is out
    assert same_bits(got, want if out_dtype is None else want.to(out_dtype))


# ---------------------------------------------------------------- 4. kth_largest and the magnitude cut


def kth_reference(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(values, values.numel() - k + 1).values


def ks(n: int) -> list[int]:
    return sorted({1, 2, n // 3, n // 2, n - 1, n})


N_SAMPLED = 300_001  # above the cut-off of 4·65536 entries: the sampled path


def _random(n: int = N_SAMPLED) -> torch.Tensor:
    return torch.randn(n, generator=gen(110))


def _half_zeros_half_ones(shuffled: bool) -> torch.Tensor:
    n = N_SAMPLED
    half = torch.cat([torch.zeros(n // 2), torch.ones(n - n // 2)])
    return half[torch.randperm(n, generator=gen(113))] if shuffled else half


KTH_CASES = {
    "random": _random,
    "random_just_above_the_cut_off": lambda: torch.rand(4 * sp._SAMPLE + 1, generator=gen(111)),
    "random_large_stride": lambda: torch.randn(1_000_003, generator=gen(112)),
    "half_zeros_half_ones": lambda: _half_zeros_half_ones(True),
    "half_zeros_half_ones_in_blocks": lambda: _half_zeros_half_ones(False),
    "ascending": lambda: torch.sort(_random()).values,
    "descending": lambda: torch.sort(_random(), descending=True).values,
    "constant": lambda: torch.full((N_SAMPLED,), 0.375),
    "few_distinct": lambda: torch.randint(0, 5, (N_SAMPLED,), generator=gen(114)).float(),
}


@pytest.mark.parametrize("name", list(KTH_CASES))
def test_kth_largest_is_kthvalue(name):
    values = KTH_CASES[name]()
    assert values.numel() > 4 * sp._SAMPLE
    # kthvalue(values, n − k + 1) is the (n − k + 1)-th smallest: entry n − k of the ascending sort. The
    # sort stands in for kthvalue on the descending input, where torch's kthvalue takes seconds.
    ascending = torch.sort(values).values
    n = values.numel()
    for k in ks(n):
        want = ascending[n - k]
        if name != "descending":
            assert kth_reference(values, k).item() == want.item()
        assert sp.kth_largest(values, k).item() == want.item(), (name, k)


def unrepresentative(n: int, seed: int, every_other: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Small values at the positions the strided sample reads (multiples of n // 65536); huge values in a
    region of the others (a contiguous block, or every unsampled position)."""
    stride = n // sp._SAMPLE
    values = torch.rand(n, generator=gen(seed))
    unsampled = torch.arange(n) % stride != 0
    if not every_other:
        unsampled &= (torch.arange(n) > n // 5) & (torch.arange(n) < 3 * n // 5)
    values[unsampled] = 1e6 + torch.rand(int(unsampled.sum()), generator=gen(seed + 1))
    return values, values[::stride]


@pytest.mark.parametrize("every_other", [False, True])
def test_kth_largest_is_exact_when_the_sample_is_unrepresentative(every_other):
    n = N_SAMPLED
    values, sample = unrepresentative(n, 120, every_other)
    assert sample.max() < 1 and int((values > 1).sum()) > n // 4  # the sample sees none of the huge values
    for k in ks(n) + [n // 10, int(0.99 * n), n // 4, 3 * n // 4]:
        assert sp.kth_largest(values, k).item() == kth_reference(values, k).item(), k


def test_kth_largest_below_the_sampling_cut_off():
    values = torch.randn(5_003, generator=gen(130))
    for k in ks(values.numel()):
        assert sp.kth_largest(values, k).item() == kth_reference(values, k).item()


def cut_inputs(n: int, seed: int):
    base = grid((n,), seed)
    model = (base.float() + grid((n,), seed + 1, -3, 3).float()).bfloat16()
    return base, model, (model.float() - base.float()).abs()


@pytest.mark.parametrize("n", [10_027, 300_001])
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.77, 0.9999])
def test_magnitude_cut_masks_slice_by_slice_the_entries_top_k_mask_keeps(small_slices, n, density):
    base, model, mags = cut_inputs(n, 140)
    k = max(1, int(density * n))
    want = top_k_reference(mags, k)
    assert same_bits(sp.top_k_mask(mags, k), want)

    cut = sp.magnitude_cut(model, base, density)
    assert cut is not None
    pieces = [cut.mask(mags[a:b], a) for a, b in slices.spans(n)]
    assert len(pieces) == -(-n // SMALL_SLICE)
    got = torch.cat(pieces)
    assert got.dtype == torch.float32
    assert same_bits(got, want)
    assert int(got.sum()) == k


def test_magnitude_cut_keeps_everything_at_density_one():
    base, model, _ = cut_inputs(1000, 150)
    assert sp.magnitude_cut(model, base, 1.0) is None


# ---------------------------------------------------------------- 5. the runtime: results in the saved dtype


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(without_provenance(p.read_bytes()) for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def test_result_dtypes_on_a_hand_built_graph():
    g = Graph()
    x, y = (g.add(Load(Path(f"/ckpt/{k}"), "w", (4, 4), torch.bfloat16)) for k in "xy")

    def apply(*inputs: int) -> int:
        return g.add(Apply("linear", linear.Params(), False, "w", (4, 4)), inputs)

    def save(n: int, folder: str, dtype: torch.dtype) -> None:
        g.add(Save(Path(f"/out/{folder}"), "w", (4, 4), dtype), (n,))

    only_bf16 = apply(x, y)
    save(only_bf16, "a", torch.bfloat16)
    two_fp16 = apply(x, y, y)
    save(two_fp16, "b", torch.float16)
    save(two_fp16, "c", torch.float16)
    mixed = apply(y, x)
    save(mixed, "d", torch.bfloat16)
    save(mixed, "e", torch.float32)
    feeds_apply = apply(x, x)
    save(feeds_apply, "f", torch.bfloat16)
    top = apply(feeds_apply, y)
    save(top, "g", torch.bfloat16)
    unused = apply(y, y)
    assert ex.saved_dtype_results(g) == {only_bf16: torch.bfloat16, two_fp16: torch.float16, top: torch.bfloat16}
    assert unused not in ex.saved_dtype_results(g)


NESTED = """
k = karcher(code, math, weights = [2, 1])
s = slerp(base, k, t = 0.5)
save s to "{out}/s" { dtype = bf16 }
save k to "{out}/k" { dtype = bf16 }
"""


def test_result_dtypes_on_a_compiled_plan(tmp_path):
    plan = compile_recipe("r.merge", text=HEAD + NESTED.replace("{out}", str(tmp_path)))
    g = plan.graph
    dtypes = ex.saved_dtype_results(g)
    applies = {op: [n for n in g.of_kind(Apply) if g.payload(n).op == op] for op in ("karcher", "slerp")}
    assert applies["karcher"] and applies["slerp"]
    for n in applies["slerp"]:  # its only user is the bf16 save
        assert all(isinstance(g.payload(u), Save) for u in g.successors(n))
        assert dtypes[n] == torch.bfloat16
    for n in applies["karcher"]:  # also read by the slerp
        assert any(isinstance(g.payload(u), Apply) for u in g.successors(n))
        assert n not in dtypes


def spy_out_dtypes(monkeypatch, ops) -> dict[str, set]:
    """Record the dtype of `out` each named operator's merge is given (None when not given)."""
    seen: dict[str, set] = {op: set() for op in ops}
    for name in ops:
        op = ORIGINAL_OPERATORS[name]  # not a spy a previous call left in OPERATORS

        def merge(tensors, params, ctx, _merge=op.merge, _name=name):
            seen[_name].add(None if ctx.out is None else ctx.out.dtype)
            return _merge(tensors, params, ctx)

        monkeypatch.setitem(OPERATORS, name, dataclasses.replace(op, merge=merge))
    return seen


def run_both_ways(tmp_path: Path, body: str, monkeypatch, ops) -> tuple[dict, dict]:
    """Run `body` with the runtime's dtype choice, then with every result float32 cast at save time.
    Returns ({output: (digest native, digest float32)}, {label: the out dtypes each op was given})."""
    monkeypatch.setattr(slices, "SLICE", SMALL_SLICE)  # the example tensors span several slices
    digests: dict[str, list[str]] = {}
    given = {}
    original = ex.saved_dtype_results
    for label in ("native", "float32"):
        monkeypatch.setattr(ex, "saved_dtype_results", original if label == "native" else (lambda graph: {}))
        seen = spy_out_dtypes(monkeypatch, ops)
        out = tmp_path / label
        run("r.merge", text=HEAD + body.replace("{out}", str(out)), device="cpu")
        given[label] = seen
        for folder in sorted(out.iterdir()):
            digests.setdefault(folder.name, []).append(digest(folder))
    return {name: tuple(d) for name, d in digests.items()}, given


def test_native_and_float32_results_write_the_same_bytes(tmp_path, monkeypatch):
    body = """
l = linear(code, math, prose, weights = [0.5, -0.2, 0.7])
s = slerp(base, code, t = [0.1, 0.5, 0.9])
k = karcher(code, math, prose, weights = [2, 1, 1], max_iter = 20, tol = 1e-6)
t = ties(code, math, prose, base = base, density = [0.5, 0.3, 0.7], weights = [1, 0.5, 1])
h = linear(math, prose, weights = [1, 3])
save l to "{out}/l" { dtype = bf16 }
save s to "{out}/s" { dtype = bf16 }
save k to "{out}/k" { dtype = bf16 }
save t to "{out}/t" { dtype = bf16 }
save h to "{out}/h" { dtype = fp16 }
"""
    ops = ("linear", "slerp", "karcher", "ties")
    digests, given = run_both_ways(tmp_path, body, monkeypatch, ops)
    assert set(digests) == {"l", "s", "k", "t", "h"}
    for name, (native, wide) in digests.items():
        assert native == wide, name
    # the two runs did take the two paths
    assert given["native"]["linear"] == {torch.bfloat16, torch.float16}
    for op in ("slerp", "karcher", "ties"):
        assert given["native"][op] == {torch.bfloat16}, op
    for op in ops:
        assert given["float32"][op] == {torch.float32}, op


def test_a_nested_recipe_writes_the_same_bytes_both_ways(tmp_path, monkeypatch):
    digests, given = run_both_ways(tmp_path, NESTED, monkeypatch, ("karcher", "slerp"))
    assert set(digests) == {"s", "k"}
    for name, (native, wide) in digests.items():
        assert native == wide, name
    assert given["native"]["karcher"] == {torch.float32}  # read by the slerp too: float32
    assert given["native"]["slerp"] == {torch.bfloat16}


# ---------------------------------------------------------------- 6. the allocator


def test_keep_freed_memory_returns_a_bool_and_is_idempotent():
    first = keep_freed_memory()
    assert isinstance(first, bool)
    second = keep_freed_memory()
    assert isinstance(second, bool) and second == first
    a = torch.ones(1 << 20)  # allocation and freeing still work after it
    del a
    assert torch.zeros(1 << 20).sum().item() == 0


def test_mgc_malloc_default_leaves_the_allocator_alone():
    code = "from mgc.runtime.allocator import keep_freed_memory; print(keep_freed_memory())"
    env = {**os.environ, "MGC_MALLOC": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- float16 overflow


def test_a_result_that_overflows_a_float16_save_is_an_error_on_both_paths():
    from mgc.core.errors import MergeRuntimeError

    params = OPERATORS["linear"].params(weights=[1.0, 1.0], normalize=False)
    p = Apply("linear", params, False, "w", (4,))
    big = torch.full((4,), 40000.0, dtype=torch.bfloat16)
    # written in float16 by the operator: the check sees the Inf and names the dtype
    with pytest.raises(MergeRuntimeError, match="float16"):
        ap.run_apply(p, [big, big], torch.device("cpu"), torch.float16)
    # computed in float32 (79872, finite), then cast at the save
    result = ap.run_apply(p, [big, big], torch.device("cpu"), torch.float32)
    assert float(result[0]) == 79872.0
    save = Save(Path("/tmp/out"), "w", (4,), torch.float16)
    with pytest.raises(MergeRuntimeError, match="overflows float16"):
        ex._cast_for_save(result, save, p)
    assert torch.equal(ex._cast_for_save(result / 4, save, p), (result / 4).half())


@pytest.mark.parametrize("name", ["random", "half_zeros_half_ones", "half_zeros_half_ones_in_blocks", "constant",
                                  "few_distinct", "descending"])
def test_magnitude_cut_without_the_whole_magnitudes_is_the_cut_of_the_whole(small_slices, name):
    """The streamed cut (bit counts over slices) keeps exactly the entries the whole-tensor cut keeps, ties at the
    k-th value included, on inputs full of ties."""
    model = KTH_CASES[name]()
    base = torch.zeros_like(model)
    mags = model.abs()
    n = model.numel()
    for k in ks(n)[:-1]:
        density = k / n + 0.1 / n  # int(density · n) == k
        assert max(1, int(density * n)) == k
        cut = sp.magnitude_cut(model, base, density)
        assert cut == sp._cut(mags, k), (name, k)
