"""mgc.diagnose and `mgc diagnose`: per-layer activation variance, effective rank, numerical rank."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mgc.diagnose import activation_variance, effective_rank, numerical_rank, statistics

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
BASE, CODE = str(MODELS / "base"), str(MODELS / "code")
LAYERS, HIDDEN = 8, 64

TEXT = """def add(a, b):
    return a + b

The quick brown fox jumps over the lazy dog, and the dog sleeps on.

x = [i * i for i in range(10)]
for value in x:
    print(value)
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ statistics, known cases


def test_effective_rank_of_isotropic_gaussian_is_near_d():
    """Covariance eigenvalues of n isotropic samples in dimension d follow Marchenko-Pastur with mean 1
    and variance q = d/n; to second order EffRank = d * exp(-q/2), i.e. d - d^2/(2n) = 31.97 for d = 32,
    n = 20000. The tolerance (0.5% of d = 0.16) is six times that deficit, and the deficit's own sampling
    spread is far smaller; a mean offset checks the centring."""
    n, d = 20_000, 32
    h = torch.randn(n, d, generator=_gen(), dtype=torch.float64) + 5.0
    erank = effective_rank(h)
    assert erank == pytest.approx(d, abs=0.005 * d)
    assert erank < d  # exp(entropy) is at most d, equal only for a perfectly flat spectrum
    assert erank == pytest.approx(d * math.exp(-d / (2 * n)), abs=0.02)


def test_effective_rank_of_rank_one_sample_is_one():
    z = torch.randn(5_000, 1, generator=_gen(1))
    u = torch.randn(1, 48, generator=_gen(2))
    h = z @ u + torch.randn(1, 48, generator=_gen(3))  # rank 1 after centring (the offset is the mean)
    assert effective_rank(h) == pytest.approx(1.0, abs=1e-4)
    # a little isotropic noise lifts it only a little: 48 directions with 1e-6 of the variance each
    noisy = h + 1e-3 * torch.randn(h.shape, generator=_gen(4))
    assert 1.0 < effective_rank(noisy) < 1.01


def test_effective_rank_of_a_flat_k_dim_subspace_is_k():
    q, _ = torch.linalg.qr(torch.randn(40, 6, generator=_gen(5), dtype=torch.float64))  # orthonormal 6-frame in R^40
    h = torch.randn(50_000, 6, generator=_gen(6), dtype=torch.float64) @ q.T
    assert effective_rank(h) == pytest.approx(6, abs=0.01)


@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_numerical_rank_of_rank_k_sample_is_k(k):
    """Exactly rank k (plus a mean offset), in float32 as activations are: rtol = 1e-3 sits far above
    float32 round-off (~1e-7 relative), so the rank is exact."""
    a = torch.randn(2_000, k, generator=_gen(k))
    b = torch.randn(k, 64, generator=_gen(k + 100))
    h = (a @ b + 3.0).float()
    assert numerical_rank(h) == k
    assert statistics(h)["numerical_rank"] == k


def test_numerical_rank_threshold_is_relative():
    # singular values 1, 1e-2, 1e-4 (times sqrt(n-1)) along three orthogonal directions
    n = 1_000
    z = torch.randn(n, 3, generator=_gen(7), dtype=torch.float64)
    z = (z - z.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T)).T)  # whiten exactly
    h = z * torch.tensor([1.0, 1e-2, 1e-4], dtype=torch.float64)
    assert numerical_rank(h) == 2  # 1e-4 < 1e-3
    assert numerical_rank(h, rtol=1e-5) == 3
    assert numerical_rank(h, rtol=0.1) == 1


def test_activation_variance_of_a_known_sample():
    h = torch.tensor([[0.0, 0.0], [2.0, 4.0]])  # per-feature unbiased variances 2 and 8
    assert activation_variance(h) == pytest.approx(5.0)
    g = torch.randn(100_000, 16, generator=_gen(8), dtype=torch.float64) * torch.arange(1, 17, dtype=torch.float64) + 7
    assert activation_variance(g) == pytest.approx(float((torch.arange(1, 17) ** 2).double().mean()), rel=0.02)
    # = trace of the covariance / d
    assert activation_variance(g) == pytest.approx(float(torch.cov(g.T).trace()) / 16, rel=1e-12)


def test_constant_activations_have_no_variance_and_no_rank():
    h = torch.ones(10, 4)
    assert statistics(h) == {"variance": 0.0, "effective_rank": 0.0, "numerical_rank": 0}
    with pytest.raises(ValueError):
        activation_variance(torch.ones(1, 4))


# ------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def base():
    pytest.importorskip("transformers")
    from mgc.evaluate import load

    return load(BASE)


def _batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")  # the post-processor adds BOS
    return enc["input_ids"], enc["attention_mask"]


def test_hidden_states_are_the_decoder_layers_outputs_over_real_tokens(base):
    from mgc.diagnose import hidden_states

    model, tokenizer = base
    ids, mask = _batch(tokenizer, ["hello world", "def f(x): return x * x  # a longer line"])
    assert mask[0].sum() < mask[1].sum()  # the first row is padded
    states = hidden_states(model, ids, mask)
    assert len(states) == LAYERS
    assert all(h.shape == (int(mask.sum()), HIDDEN) and h.dtype == torch.float32 for h in states)

    captured = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for hk in hooks:
            hk.remove()
    keep = mask.bool()
    for i in range(LAYERS):  # every entry is decoder layer i+1's output, the last one before the final norm
        assert torch.allclose(states[i], captured[i][keep], atol=1e-6)
    assert not torch.allclose(states[-1], out.hidden_states[-1][keep], atol=1e-3)  # that one is normed


def test_hidden_states_ignore_padding(base):
    from mgc.diagnose import hidden_states

    model, tokenizer = base
    text = "the quick brown fox"
    alone = hidden_states(model, *_batch(tokenizer, [text]))
    ids, mask = _batch(tokenizer, [text, text + " jumps over the lazy dog again and again"])
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[0] = mask[0].bool()
    padded = hidden_states(model, ids, mask, keep=keep)
    for a, b in zip(alone, padded):
        assert torch.allclose(a, b, atol=1e-5)


def test_layer_statistics_on_a_real_model(base):
    from mgc.diagnose import layer_statistics

    model, tokenizer = base
    rows = layer_statistics(model, *_batch(tokenizer, [TEXT, "hello world"]), bootstrap=3)
    assert [r["layer"] for r in rows] == list(range(1, LAYERS + 1))
    for r in rows:
        assert set(r) == {"layer", "variance", "effective_rank", "numerical_rank",
                          "variance_std", "effective_rank_std", "numerical_rank_std"}
        assert r["variance"] > 0 and math.isfinite(r["variance"])
        assert 1 <= r["effective_rank"] <= HIDDEN and isinstance(r["numerical_rank"], int)
        assert 1 <= r["numerical_rank"] <= HIDDEN and r["variance_std"] >= 0


# ------------------------------------------------------------------------------------ diagnose, CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("diagdata")
    (d / "docs.txt").write_text(TEXT)
    (d / "qa.jsonl").write_text('{"prompt": "2 + 2 =", "answer": " 4"}\n{"prompt": "def f(x):", "answer": " return x"}\n')
    return d


def test_diagnose_and_plot(files, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from mgc.diagnose import diagnose, plot

    res = diagnose([BASE, CODE], files / "docs.txt", device="cpu", max_tokens=30)
    assert [m["model"] for m in res["models"]] == [BASE, CODE]
    for m in res["models"]:
        assert m["tokens"] == 30 and m["hidden_size"] == HIDDEN and len(m["layers"]) == LAYERS
        # 30 tokens: both ranks are at most 29 after centring
        assert all(r["numerical_rank"] <= 29 and r["effective_rank"] <= 29 for r in m["layers"])
    res_qa = diagnose([BASE], files / "qa.jsonl", device="cpu")
    assert res_qa["models"][0]["tokens"] > 2 and len(res_qa["models"][0]["layers"]) == LAYERS
    png = plot(res, tmp_path / "sub" / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_diagnose_writes_json_and_png(files, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from click.testing import CliRunner

    from mgc.cli import main

    out = tmp_path / "diag"
    result = CliRunner().invoke(main, ["diagnose", BASE, CODE, "--data", str(files / "docs.txt"), "--out", str(out),
                                       "--device", "cpu", "--max-tokens", "40", "--bootstrap", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "diagnostics.json").read_text())
    assert [m["model"] for m in data["models"]] == [BASE, CODE] and data["bootstrap"] == 2
    assert all(len(m["layers"]) == LAYERS for m in data["models"])
    assert (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG" and (out / "diagnostics.png").stat().st_size > 10_000
    text = result.output
    assert "activation variance" in text and "effective rank" in text and "numerical rank" in text
    table = text.split("effective rank")[1].splitlines()
    assert table[1].split() == ["layer", BASE, CODE]
    assert [line.split()[0] for line in table[2:2 + LAYERS]] == [str(i) for i in range(1, LAYERS + 1)]
    assert "fewer tokens than hidden size" in text  # 40 tokens < 64 + 1


def test_cli_diagnose_reports_a_missing_model(files, tmp_path):
    pytest.importorskip("transformers")
    from click.testing import CliRunner

    from mgc.cli import main

    result = CliRunner().invoke(main, ["diagnose", str(tmp_path / "nope"), "--data", str(files / "docs.txt"),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "nope: no such checkpoint folder" in result.output
