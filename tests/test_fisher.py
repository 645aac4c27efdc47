"""`fisher(model, data = "...")`: the empirical diagonal Fisher against a direct torch.autograd computation, the
cache (key, reuse, atomic writes), tied embeddings, the recipe builtin end to end, and its located errors."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mgc.fisher as fz
from mgc.api import compile_recipe, run as run_recipe
from mgc.core import documents
from mgc.compiler import fisher_cache
from mgc.core.errors import CheckpointError, MgcError, RecipeNameError, RecipeTypeError
from mgc.compiler.values import FisherModel
from mgc.lm import MissingExtraError

transformers = pytest.importorskip("transformers")

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
CODE_TEXT = "def add(a, b):\n    return a + b\n\nfor i in range(3):\n    print(i)\n\nclass A:\n    pass\n\nx = [1, 2]\n"
MATH_TEXT = "2 + 3 = 5\n\nsolve 3x = 9, so x = 3\n\nthe sum of 1 and 1 is 2\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MGC_CACHE", str(root))
    return root


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    (tmp_path / "code.txt").write_text(CODE_TEXT)
    (tmp_path / "math.txt").write_text(MATH_TEXT)
    return {"code": tmp_path / "code.txt", "math": tmp_path / "math.txt"}


def reference_fisher(model_dir: Path, docs: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Independently: per document, the gradient of its log-likelihood (-(T-1)·mean CE from the model's own loss)
    with torch.autograd, squared, averaged over documents; keyed by the model's (deduplicated) parameter names."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    named = list(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in named}
    for doc in docs:
        ids = tok(doc, truncation=True, max_length=max_length, return_tensors="pt").input_ids
        loss = model(input_ids=ids, labels=ids).loss  # mean over the T-1 predicted tokens
        loglik = -loss * (ids.shape[1] - 1)
        grads = torch.autograd.grad(loglik, [p for _, p in named])
        for (n, _), g in zip(named, grads):
            total[n] += g.double().pow(2).float()
    return {n: t / len(docs) for n, t in total.items()}


# --- the estimator ------------------------------------------------------------------------------------------


def test_documents_split_on_blank_lines():
    assert documents.split_documents("a\nb\n\n\n  c\n   \nd\n") == ["a\nb", "  c", "d"]
    assert documents.split_documents("one\r\ntwo\n\nthree\n") == ["one\ntwo", "three"]
    assert documents.split_documents("l1\nl2\n  l3\n") == ["l1\nl2\n  l3"]  # no blank line: one document, as in mgc eval
    assert documents.split_documents("\n \n") == []


def test_fisher_matches_direct_autograd(data):
    docs = fz.read_documents(data["code"])
    assert len(docs) == 4
    got = fz.estimate_fisher(MODELS / "code", data["code"], samples=3, max_length=8, device="cpu")
    ref = reference_fisher(MODELS / "code", docs[:3], 8)
    header = load_file(MODELS / "code" / "model.safetensors")
    assert got.keys() == header.keys() == ref.keys()
    nonzero = 0
    for name, f in got.items():
        assert f.dtype == torch.float32 and f.shape == header[name].shape, name
        assert (f >= 0).all(), name
        torch.testing.assert_close(f, ref[name], rtol=1e-4, atol=1e-12, msg=name)
        nonzero += bool(f.abs().sum() > 0)
    assert nonzero == len(got)
    # samples = 1 is the first document alone
    one = fz.estimate_fisher(MODELS / "code", data["code"], samples=1, max_length=8, device="cpu")
    ref1 = reference_fisher(MODELS / "code", docs[:1], 8)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.3.mlp.down_proj.weight"):
        torch.testing.assert_close(one[name], ref1[name], rtol=1e-4, atol=1e-12, msg=name)


def tied_checkpoint(folder: Path, lm_head: str) -> Path:
    """The code model with tie_word_embeddings: lm_head absent, or stored equal to the embeddings."""
    shutil.copytree(MODELS / "code", folder)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    sd = load_file(folder / "model.safetensors")
    if lm_head == "absent":
        del sd["lm_head.weight"]
    else:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_tied_embeddings(tmp_path, data):
    absent = tied_checkpoint(tmp_path / "absent", "absent")
    got = fz.estimate_fisher(absent, data["math"], samples=2, max_length=8, device="cpu")
    assert "lm_head.weight" not in got and "model.embed_tokens.weight" in got
    ref = reference_fisher(absent, fz.read_documents(data["math"])[:2], 8)
    assert "lm_head.weight" not in ref  # one tied parameter: both uses feed its gradient
    torch.testing.assert_close(got["model.embed_tokens.weight"], ref["model.embed_tokens.weight"], rtol=1e-4, atol=1e-12)

    present = tied_checkpoint(tmp_path / "present", "equal")
    model = transformers.AutoModelForCausalLM.from_pretrained(present)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the model ties them
    got = fz.estimate_fisher(present, data["math"], samples=2, max_length=8, device="cpu")
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    torch.testing.assert_close(got["model.embed_tokens.weight"], ref["model.embed_tokens.weight"], rtol=1e-4, atol=1e-12)


# --- the cache -----------------------------------------------------------------------------------------------


def test_cache_is_written_once_and_reused(cache, data, monkeypatch):
    calls = []
    real = fz._estimate
    monkeypatch.setattr(fz, "_estimate", lambda *a: calls.append(a) or real(*a))
    path = fz.cached_fisher(MODELS / "code", data["code"], samples=2, max_length=8, device="cpu")
    assert path.parent == cache / "fisher" and len(calls) == 1
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "fisher.json", "model.safetensors"]
    assert (path / "config.json").read_bytes() == (MODELS / "code" / "config.json").read_bytes()
    info = json.loads((path / "fisher.json").read_text())
    assert info["samples"] == 2 and info["max_length"] == 8 and info["documents_used"] == 2
    assert info["data_sha256"] == fz.inspect_data(data["code"]).sha256 and info["key"] == path.name
    stored = load_file(path / "model.safetensors")
    direct = fz.estimate_fisher(MODELS / "code", data["code"], samples=2, max_length=8, device="cpu")
    assert stored.keys() == direct.keys() and all(torch.equal(stored[n], direct[n]) for n in direct)
    mtime = path.stat().st_mtime_ns
    calls.clear()
    assert fz.cached_fisher(MODELS / "code", data["code"], samples=2, max_length=8, device="cpu") == path
    assert calls == [] and path.stat().st_mtime_ns == mtime
    assert [p.name for p in (cache / "fisher").iterdir()] == [path.name]  # no temporary folder left


def test_a_failed_write_leaves_no_cache(cache, data, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        fz.cached_fisher(MODELS / "code", data["math"], samples=1, max_length=8, device="cpu")
    assert list((cache / "fisher").iterdir()) == []


def test_cache_key(tmp_path, data):
    key = fz.fisher_key(MODELS / "code", data["code"], 64, 256)
    assert key == fz.fisher_key(MODELS / "code", data["code"], 64, 256)
    copy = tmp_path / "elsewhere.txt"
    shutil.copy(data["code"], copy)
    assert fz.fisher_key(MODELS / "code", copy, 64, 256) == key  # the data's content counts, not its path
    copy.write_text(CODE_TEXT + "\nmore\n")
    assert fz.fisher_key(MODELS / "code", copy, 64, 256) != key
    assert fz.fisher_key(MODELS / "code", data["code"], 63, 256) != key
    assert fz.fisher_key(MODELS / "code", data["code"], 64, 128) != key
    assert fz.fisher_key(MODELS / "math", data["code"], 64, 256) != key  # same headers, other weights
    # weights changed in place with the mtime put back: the sampled tensor bytes still change the key
    model = tmp_path / "code"
    shutil.copytree(MODELS / "code", model)
    base = fz.fisher_key(model, data["code"], 64, 256)
    file = model / "model.safetensors"
    st = file.stat()
    raw = bytearray(file.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    entry = json.loads(raw[8:8 + header_len])["model.norm.weight"]
    raw[8 + header_len + entry["data_offsets"][0]] ^= 0xFF
    file.write_bytes(bytes(raw))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fz.fisher_key(model, data["code"], 64, 256) != base


# --- the recipe language, end to end --------------------------------------------------------------------------


def recipe(data: dict[str, Path], body: str) -> str:
    head = f'code = model("{MODELS / "code"}")\nmath = model("{MODELS / "math"}")\n'
    return head + body.replace("CODE", str(data["code"])).replace("MATH", str(data["math"]))


def test_end_to_end_fisher_merge_and_karcher(tmp_path, cache, data, monkeypatch):
    text = recipe(data, (
        'fa = fisher(code, data = "CODE", samples = 3, max_length = 16)\n'
        'fb = fisher(math, data = "MATH", max_length = 16)\n'
        'save fisher_merge(code, math, fisher = [fa, fb]) to "fm"\n'
        'save karcher(code, math, fisher = [fa, fb]) to "k"\n'
    ))
    plan = compile_recipe(tmp_path / "r.merge", text=text)  # check + plan: nothing computed
    assert not (cache / "fisher").exists()
    fishers = list(plan.program.fishers.values())
    assert [type(f) for f in fishers] == [FisherModel, FisherModel]
    assert all(f.tensors["lm_head.weight"].dtype == torch.float32 for f in fishers)
    assert "to compute" in "\n".join(fz.plan_lines(plan))

    out = tmp_path / "out"
    plan, stats = run_recipe(tmp_path / "r.merge", text=text, output=out, device="cpu")
    assert stats.tensors_written == 150
    fa, fb = (fishers[0].cache_path, fishers[1].cache_path)
    assert fz.is_cached(fa) and fz.is_cached(fb) and "cached" in "\n".join(fz.plan_lines(plan))
    assert json.loads((fb / "fisher.json").read_text())["documents_used"] == 3  # samples = 64 > 3 documents

    code, math_ = load_file(MODELS / "code" / "model.safetensors"), load_file(MODELS / "math" / "model.safetensors")
    Fa, Fb = load_file(fa / "model.safetensors"), load_file(fb / "model.safetensors")
    merged = load_file(out / "fm" / "model.safetensors")
    for name in code:
        x, y = code[name].float(), math_[name].float()
        fx, fy = Fa[name] * 0.5 + 0.5e-8, Fb[name] * 0.5 + 0.5e-8
        expected = ((fx * x + fy * y) / (fx + fy)).to(torch.bfloat16)
        torch.testing.assert_close(merged[name].float(), expected.float(), rtol=2**-7, atol=1e-6, msg=name)
    for sub in ("fm", "k"):
        model = transformers.AutoModelForCausalLM.from_pretrained(out / sub)
        logits = model(input_ids=torch.tensor([[1, 5, 9, 42]])).logits
        assert torch.isfinite(logits).all()

    # a second run reuses both caches
    monkeypatch.setattr(fz, "_estimate", lambda *a: pytest.fail("recomputed a cached Fisher"))
    run_recipe(tmp_path / "r.merge", text=text, output=tmp_path / "out2", device="cpu")
    assert load_file(tmp_path / "out2" / "k" / "model.safetensors").keys() == merged.keys()


def check_error(tmp_path, data, body: str, kind=MgcError) -> tuple[MgcError, str]:
    text = recipe(data, body)
    with pytest.raises(MgcError) as info:
        compile_recipe(tmp_path / "r.merge", text=text)
    assert isinstance(info.value, kind), info.value.render()
    return info.value, text


def assert_at(err: MgcError, text: str, needle: str) -> None:
    line = text.count("\n", 0, text.index(needle)) + 1
    col = text.index(needle) - (text.rfind("\n", 0, text.index(needle)) + 1) + 1
    assert (err.span.line, err.span.col) == (line, col), err.render()


def test_errors_are_located(tmp_path, data, monkeypatch):
    err, text = check_error(tmp_path, data, 'fa = fisher(code, data = "nope/missing.txt")\nsave fa to "o"\n', CheckpointError)
    assert "no data file at 'nope/missing.txt'" in err.message
    assert_at(err, text, '"nope/missing.txt"')

    err, text = check_error(tmp_path, data, 'm = linear(code, math)\nfa = fisher(m, data = "CODE")\nsave fa to "o"\n',
                            RecipeTypeError)
    assert "checkpoint model" in err.message and "save the merge first" in err.hint
    assert_at(err, text, "m, data")

    err, text = check_error(tmp_path, data, 'fa = fisher(code, data = "CODE", samples = 0)\nsave fa to "o"\n',
                            RecipeTypeError)
    assert "samples must be at least 1" in err.message
    assert_at(err, text, "0)")

    err, text = check_error(tmp_path, data, 'fa = fisher(code, data = "CODE", sample = 4)\nsave fa to "o"\n',
                            RecipeNameError)
    assert "unknown parameter 'sample'" in err.message and err.hint == "did you mean 'samples'?"
    assert_at(err, text, "sample =")

    err, _ = check_error(tmp_path, data, 'fa = fisher(code)\nsave fa to "o"\n', RecipeTypeError)
    assert "data" in err.message
    err, text = check_error(tmp_path, data, 'fa = fisher(code, data = 3)\nsave fa to "o"\n', RecipeTypeError)
    assert_at(err, text, "3)")
    (tmp_path / "empty.txt").write_text("\n\n")
    err, text = check_error(tmp_path, data, f'fa = fisher(code, data = "{tmp_path / "empty.txt"}")\nsave fa to "o"\n')
    assert "holds no text" in err.message
    assert_at(err, text, f'"{tmp_path / "empty.txt"}"')

    monkeypatch.setattr(fisher_cache, "transformers_available", lambda: False)
    err, text = check_error(tmp_path, data, 'fa = fisher(code, data = "CODE")\nsave fa to "o"\n')
    assert "transformers" in err.message and "mgc[eval]" in err.hint
    assert_at(err, text, "fisher(code")


def test_missing_transformers_is_a_clear_error(data, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(MissingExtraError, match="fisher\\(\\) needs the optional package 'transformers'") as info:
        fz.estimate_fisher(MODELS / "code", data["code"], samples=1, device="cpu")
    assert "mgc[eval]" in info.value.hint
