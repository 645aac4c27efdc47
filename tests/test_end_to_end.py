"""The example recipes end to end: outputs against an independent torch computation, loading in
transformers, frankenmerge's several outputs, and the command line."""
from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from mgc.api import run
from mgc.cli import main
from mgc.compiler.ir import Load
from conftest import load_folder

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MODELS = EXAMPLES / "models"
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------- helpers



def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().view(torch.uint8).reshape(-1).equal(
        b.contiguous().view(torch.uint8).reshape(-1)
    )


def layer_of(name: str):
    m = LAYER.match(name)
    return None if m is None else int(m.group(1))


@contextlib.contextmanager
def in_repo():
    with contextlib.chdir(REPO):
        yield


def check_loads_in_transformers(folder: Path, num_layers: int) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == num_layers
    assert len(model.model.layers) == num_layers
    enc = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # transformers loaded exactly the tensors on disk
    on_disk = load_folder(folder)
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", f"model.layers.{num_layers - 1}.mlp.down_proj.weight"):
        assert torch.equal(state[name].to(on_disk[name].dtype), on_disk[name])


# ---------------------------------------------------------------- the reference math (float64)


def karcher_ref(xs: list[torch.Tensor], weights, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The seed paper's spherical Karcher mean, rescaled by the weighted mean norm."""
    x = [t.double().reshape(-1) for t in xs]
    w = torch.tensor(weights, dtype=torch.float64)
    alpha = w / w.sum()
    norms = [v.norm() for v in x]
    units = [v / n for v, n in zip(x, norms)]
    u = sum(a * v for a, v in zip(alpha, units))
    u = u / u.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for a, v in zip(alpha, units):
            cos = torch.clamp(v @ u, -1.0, 1.0)
            theta = torch.arccos(cos)
            ratio = theta / torch.sin(theta) if theta > 1e-12 else torch.tensor(1.0, dtype=torch.float64)
            tangent += a * ratio * (v - cos * u)
        t_norm = tangent.norm()
        if t_norm < tol:
            break
        u = torch.cos(t_norm) * u + torch.sin(t_norm) * tangent / t_norm
    scale = sum(a * n for a, n in zip(alpha, norms))
    return (scale * u).reshape(xs[0].shape)


def slerp_ref(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """mergekit's slerp, in float64."""
    v0, v1 = v0.double(), v1.double()
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = (u0 * u1).sum()
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta_0 = torch.arccos(dot)
    sin_theta_0 = torch.sin(theta_0)
    theta_t = theta_0 * t
    s0 = torch.sin(theta_0 - theta_t) / sin_theta_0
    s1 = torch.sin(theta_t) / sin_theta_0
    return s0 * v0 + s1 * v1


def ramp_t(name: str, lo: float = 0.3, hi: float = 0.7, num_layers: int = 8) -> float:
    i = layer_of(name)
    return lo if i is None else lo + (hi - lo) * i / (num_layers - 1)


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns mapped to integers whose difference counts ulps."""
    bits = t.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    mag = bits & 0x7FFF
    return torch.where(bits >= 0x8000, -mag, mag)


@pytest.fixture(scope="module")
def inputs() -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_folder(MODELS / name) for name in ("base", "code", "math", "prose")}


# ---------------------------------------------------------------- quickstart


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart") / "q"
    with in_repo():
        plan, stats = run("examples/quickstart.merge", output=out, device="cpu")
    assert plan.program.saves[0].path == out.resolve()
    assert stats.tensors_written == 75
    return out


def test_quickstart_matches_independent_math(quickstart, inputs):
    got = load_folder(quickstart)
    assert set(got) == set(inputs["base"])
    total = equal = 0
    worst = 0
    for name, base in inputs["base"].items():
        experts = karcher_ref([inputs[m][name] for m in ("code", "math", "prose")], [2, 1, 1])
        ref = slerp_ref(ramp_t(name), base, experts).to(torch.bfloat16)
        out = got[name]
        assert out.dtype == torch.bfloat16 and out.shape == base.shape, name
        diff = (ordered_bits(out) - ordered_bits(ref)).abs()
        worst = max(worst, int(diff.max()))
        assert int(diff.max()) <= 1, (name, int(diff.max()))
        total += diff.numel()
        equal += int((diff == 0).sum())
    assert equal / total > 0.999, (equal, total)
    assert worst <= 1


def test_quickstart_output_folder(quickstart):
    base_config = json.loads((MODELS / "base" / "config.json").read_text())
    config = json.loads((quickstart / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_key_value_heads"):
        assert config[key] == base_config[key], key
    assert config["torch_dtype"] == "bfloat16"
    for f in TOKENIZER_FILES + ("generation_config.json",):
        assert (quickstart / f).read_bytes() == (MODELS / "base" / f).read_bytes(), f
    # shard = "2GB": one file, no index
    assert sorted(p.name for p in quickstart.glob("*.safetensors")) == ["model.safetensors"]
    assert not (quickstart / "model.safetensors.index.json").exists()
    assert not any("mgc-tmp" in p.name for p in quickstart.parent.iterdir())


def test_quickstart_loads_in_transformers(quickstart):
    check_loads_in_transformers(quickstart, 8)


# ---------------------------------------------------------------- frankenmerge: several outputs


@pytest.fixture(scope="module")
def franken(tmp_path_factory):
    out = tmp_path_factory.mktemp("franken") / "fm"
    with in_repo():
        plan, stats = run("examples/frankenmerge.merge", output=out, device="cpu")
    return plan, stats, out


def test_frankenmerge_outputs(franken):
    plan, stats, out = franken
    assert sorted(p.name for p in out.iterdir()) == ["final", "soup", "tall", "ties"]
    assert [s.path for s in plan.program.saves] == [(out / n).resolve() for n in ("final", "tall", "ties", "soup")]


def test_frankenmerge_tall(franken, inputs):
    _, _, out = franken
    tall = out / "tall"
    config = json.loads((tall / "config.json").read_text())
    assert config["num_hidden_layers"] == 12
    tensors = load_folder(tall)
    layers = {layer_of(n) for n in tensors} - {None}
    assert layers == set(range(12))
    base, code = inputs["base"], inputs["code"]
    per_layer = [n[len("model.layers.0."):] for n in base if n.startswith("model.layers.0.")]
    assert len(tensors) == 12 * len(per_layer) + sum(1 for n in base if layer_of(n) is None)
    for i in range(12):
        src, j = (base, i) if i < 6 else (code, i - 4)
        for rest in per_layer:
            assert same_bytes(tensors[f"model.layers.{i}.{rest}"], src[f"model.layers.{j}.{rest}"]), (i, rest)
    for rest in per_layer:
        assert same_bytes(tensors[f"model.layers.6.{rest}"], code[f"model.layers.2.{rest}"])
        assert same_bytes(tensors[f"model.layers.0.{rest}"], base[f"model.layers.0.{rest}"])
    for n in base:
        if layer_of(n) is None:
            assert same_bytes(tensors[n], base[n]), n
    check_loads_in_transformers(tall, 12)


def test_frankenmerge_final(franken, inputs, quickstart):
    _, _, out = franken
    final = load_folder(out / "final")
    base = inputs["base"]
    assert set(final) == set(base)
    assert same_bytes(final["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    merged = load_folder(quickstart)  # the same slerp(base, karcher(...)) as quickstart
    for name, t in final.items():
        i = layer_of(name)
        if name == "model.embed_tokens.weight" or (i is not None and i < 2):
            assert same_bytes(t, base[name]), name
        else:
            assert not torch.equal(t, base[name]), name
            assert same_bytes(t, merged[name]), name


def test_frankenmerge_soup_is_sharded(franken, inputs):
    _, _, out = franken
    soup = out / "soup"
    files = sorted(p.name for p in soup.glob("*.safetensors"))
    assert len(files) >= 2
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    index = json.loads((soup / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(inputs["base"])
    assert set(weight_map.values()) == set(files)
    total = 0
    for f in files:
        with safe_open(str(soup / f), framework="pt") as h:
            names = set(h.keys())
            assert names == {n for n, x in weight_map.items() if x == f}
            size = sum(h.get_tensor(n).numel() * h.get_tensor(n).element_size() for n in names)
        assert size <= 300_000 or len(names) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    # soup = linear(code, math, prose): the plain mean, in float32, cast back to the source dtype
    got = load_folder(soup)
    for name, t in got.items():
        xs = [inputs[m][name].float() for m in ("code", "math", "prose")]
        assert same_bytes(t, ((xs[0] + xs[1] + xs[2]) / 3).to(torch.bfloat16)), name
    check_loads_in_transformers(soup, 8)


def test_frankenmerge_shares_loads(franken):
    plan, stats, _ = franken
    keys = [(plan.graph.payload(n).checkpoint, plan.graph.payload(n).tensor) for n in plan.graph.of_kind(Load)]
    assert len(keys) == len(set(keys))
    assert len(keys) == 4 * 75  # every tensor of the four checkpoints, once
    assert stats.tensors_read == len(keys)
    assert stats.tensors_written == 75 + 111 + 75 + 75
    ops = Counter(plan.graph.payload(n).op for n in plan.graph.nodes if hasattr(plan.graph.payload(n), "op"))
    # final keeps the base for embed_tokens and layers 0-1 (1 + 2*9 tensors): those are never merged
    assert ops == {"karcher": 75 - 19, "slerp": 75 - 19, "ties": 75, "linear": 75}


# ---------------------------------------------------------------- the command line


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_run_quiet(repo_root, tmp_path):
    out = tmp_path / "o"
    result = _cli("run", "--quiet", "--device", "cpu", "-o", out, "examples/quickstart.merge")
    assert result.exit_code == 0, result.output
    assert "wrote" not in result.output
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert set(load_folder(out)) == set(load_folder(MODELS / "base"))


def test_cli_run_reports(repo_root, tmp_path):
    out = tmp_path / "o"
    result = _cli("run", "--device", "cpu", "-o", out, "examples/quickstart.merge")
    assert result.exit_code == 0, result.output
    assert f"wrote {out.resolve()}" in result.output
    assert "75 tensors" in result.output


def test_cli_run_refuses_existing_folder(repo_root, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _cli("run", "--quiet", "-o", out, "examples/quickstart.merge")
    assert result.exit_code == 1
    assert "--force" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    result = _cli("run", "--quiet", "--force", "-o", out, "examples/quickstart.merge")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_cli_plan(repo_root):
    result = _cli("plan", "--explain", "examples/frankenmerge.merge")
    assert result.exit_code == 0, result.output
    text = result.output
    for name in ("eliminate_common_subexpressions", "fold_trivial_ops", "eliminate_dead_nodes", "schedule_blocks"):
        assert re.search(rf"{name}\s+\d+/\s*\d+/\s*\d+ ->\s+\d+/\s*\d+/\s*\d+", text), name
    assert re.search(r"bytes to read\s+\d", text)
    assert re.search(r"bytes to write\s+\d", text)
    assert re.search(r"peak memory\s+\d", text)
    assert "tensors read   300 from 4 checkpoints" in text


def test_cli_graph(repo_root):
    result = _cli("graph", "examples/quickstart.merge")
    assert result.exit_code == 0, result.output
    dot = result.output.strip()
    assert dot.startswith("digraph")
    assert dot.endswith("}")
    assert dot.count("->") == 75 * (3 + 2 + 1)  # per tensor: karcher 3 inputs, slerp 2, save 1


def test_cli_dry_run_writes_nothing(repo_root, tmp_path):
    out = tmp_path / "o"
    result = _cli("run", "--dry-run", "-o", out, "examples/frankenmerge.merge")
    assert result.exit_code == 0, result.output
    assert "plan for" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_check(repo_root):
    result = _cli("check", "examples/frankenmerge.merge")
    assert result.exit_code == 0, result.output
    assert "ok (4 outputs, 4 checkpoints)" in result.output


def test_cli_bad_recipe_exits_1(repo_root, tmp_path):
    recipe = tmp_path / "bad.merge"
    recipe.write_text(f'a = model("{REPO}/examples/models/base")\nsave karcher(a, weigths = [1]) to "x"\n')
    result = _cli("run", "-o", tmp_path / "o", recipe)
    assert result.exit_code == 1
    assert "bad.merge:2:" in result.output
    assert not (tmp_path / "o").exists()
