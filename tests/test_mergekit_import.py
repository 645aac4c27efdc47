"""`mgc import`: mergekit configurations (tests/fixtures/mergekit/*.yml, written from mergekit's documented
format) translated into recipes. Each translation is a golden file (NAME.merge next to NAME.yml), and the
imported recipes are run on the example models and compared with the numbers mergekit's semantics give,
computed here with torch from the input safetensors (mergekit itself is never needed).

To regenerate the golden recipes after a deliberate change, run

    MGC_UPDATE_GOLDEN=1 python -m pytest tests/test_mergekit_import.py

and read the diff.
"""
from __future__ import annotations

import json
import math as pymath
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mgc.api import compile_recipe
from mgc.cli import main
from mgc.core.errors import MgcError
from mgc.mergekit_import import import_config

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "mergekit"
CONFIGS = sorted(FIXTURES.glob("*.yml"))
MODELS = REPO / "examples" / "models"
UPDATE = os.environ.get("MGC_UPDATE_GOLDEN") == "1"
NUM_LAYERS = 8


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def inputs(name: str) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in tensors(MODELS / name).items()}


def run_import(config: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Import tests/fixtures/mergekit/CONFIG.yml into tmp_path, run it, and return the output's tensors."""
    recipe = tmp_path / "recipe.merge"
    recipe.write_text(import_config(FIXTURES / f"{config}.yml", output=recipe, root=REPO))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "-q", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {k: v.double() for k, v in tensors(out).items()}


def layer_of(name: str):
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def gradient(points: list[float], t: float) -> float:
    """mergekit's evaluate_setting for a list of numbers at position t."""
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * points[i0] + frac * points[i1]


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp (float64 here)."""
    a, b = v0.flatten(), v1.flatten()
    dot = torch.dot(a / a.norm(), b / b.norm()).item()
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta0 = pymath.acos(dot)
    s0 = pymath.sin(theta0 - theta0 * t) / pymath.sin(theta0)
    s1 = pymath.sin(theta0 * t) / pymath.sin(theta0)
    return s0 * v0 + s1 * v1


def close(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --- golden translations -------------------------------------------------------------------------------

def test_there_are_fixtures():
    assert {c.stem for c in CONFIGS} >= {
        "linear", "slerp", "ties", "dare_ties", "dare_ties_density_1", "task_arithmetic", "passthrough", "multi",
        "lora",
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_golden_translation(config: Path):
    expected = config.with_suffix(".merge")
    text = import_config(config.relative_to(REPO), output=expected.relative_to(REPO), root=REPO)
    if UPDATE:
        expected.write_text(text)
    assert text == expected.read_text(), f"run MGC_UPDATE_GOLDEN=1 python -m pytest {__file__} and read the diff"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_golden_recipes_check(config: Path, repo_root):
    compile_recipe(config.with_suffix(".merge").relative_to(REPO))


# --- the imported recipes give mergekit's numbers -------------------------------------------------------

def test_linear(tmp_path):
    code, math, prose = inputs("code"), inputs("math"), inputs("prose")
    expected = {k: 1.0 * code[k] + 0.5 * math[k] + 0.25 * prose[k] for k in code}  # normalize: false
    close(run_import("linear", tmp_path), expected)


def test_slerp_gradient_restarts_in_each_slice(tmp_path):
    base, code = inputs("base"), inputs("code")
    attn, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]

    def t_of(name: str) -> float:
        layer = layer_of(name)
        pos = 0.0 if layer is None else (layer % 4) / 3  # two slices of 4 layers: t restarts at each
        if "self_attn" in name:
            return gradient(attn, pos)
        if "mlp" in name:
            return gradient(mlp, pos)
        return 0.5

    expected = {k: slerp(t_of(k), base[k], code[k]) for k in base}
    out = run_import("slerp", tmp_path)
    close(out, expected)
    # layer 4 starts the second slice: its attention is the base's (t = 0), not t at 4/7 of the whole stack
    name = "model.layers.4.self_attn.q_proj.weight"
    torch.testing.assert_close(out[name], base[name], rtol=1e-6, atol=1e-7)


def test_task_arithmetic_filtered_weight(tmp_path):
    base, code, math = inputs("base"), inputs("code"), inputs("math")

    def merged(k):
        w_code = 0.8 if "mlp" in k else 0.3
        return base[k] + 0.9 * (w_code * (code[k] - base[k]) + 0.5 * (math[k] - base[k]))

    close(run_import("task_arithmetic", tmp_path), {k: merged(k) for k in base})


def test_passthrough_takes_norm_and_head_from_the_last_slice(tmp_path):
    base, code = inputs("base"), inputs("code")
    expected = {}
    for k in base:
        layer = layer_of(k)
        if layer is None:
            src = base if "embed_tokens" in k else code  # embeddings from the first slice, norm and head from the last
            expected[k] = src[k]
        else:
            rest = k.split(".", 3)[3]
            if layer < 6:  # base.layers[0:6], then code.layers[2:8] as layers 6..11
                expected[f"model.layers.{layer}.{rest}"] = base[k]
            if layer >= 2:
                expected[f"model.layers.{layer + 4}.{rest}"] = code[k]
    out = run_import("passthrough", tmp_path)
    close(out, expected, rtol=0, atol=0)
    assert not torch.equal(base["model.norm.weight"], code["model.norm.weight"])  # the test tells them apart


def test_multi_document_file_is_one_recipe(tmp_path):
    base, code, math, prose = inputs("base"), inputs("code"), inputs("math"), inputs("prose")
    soup = {k: (code[k] + math[k]) / 2 for k in base}
    tv = {k: base[k] + 0.7 * (prose[k] - base[k]) for k in base}

    def t_of(k):
        layer = layer_of(k)
        return gradient([0.2, 0.8], 0.0 if layer is None else layer / (NUM_LAYERS - 1))

    close(run_import("multi", tmp_path), {k: slerp(t_of(k), soup[k], tv[k]) for k in base})


def test_model_plus_lora(tmp_path):
    base, math = inputs("base"), inputs("math")
    folder = MODELS / "lora-code"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    adapter = {k: v.double() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    merged = dict(base)
    for k, a in adapter.items():
        if ".lora_A." in k:
            target = k.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            b = adapter[k.replace(".lora_A.", ".lora_B.")]
            merged[target] = base[target] + scale * (b @ a)
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    close(run_import("lora", tmp_path), {k: 0.6 * merged[k] + 0.4 * math[k] for k in base})


@pytest.mark.parametrize("config", ["ties", "dare_ties"])
def test_task_vector_methods_run(config, tmp_path):
    out = run_import(config, tmp_path)
    base = inputs("base")
    assert set(out) == set(base) and all(torch.isfinite(v).all() for v in out.values())


def trim(delta: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's magnitude trim: the int(density·numel) largest |δ| (at least one), here of equal |δ| at the
    cut those at the lowest positions first (a stable sort: mgc's documented rule). Also returns where the
    choice is one among entries tied at the cut: |δ| equal to the k-th largest, with more such than kept."""
    flat = delta.flatten()
    k = max(1, int(density * flat.numel()))
    if density >= 1 or k >= flat.numel():
        return delta, torch.zeros(delta.shape, dtype=torch.bool)
    mag = flat.abs()
    order = torch.sort(mag, descending=True, stable=True).indices
    keep = torch.zeros_like(flat)
    keep[order[:k]] = 1
    cut = mag[order[k - 1]]
    tied = (mag == cut) & (int((mag >= cut).sum()) > k)
    return (flat * keep).reshape(delta.shape), tied.reshape(delta.shape)


def disjoint_mean(deltas: list[torch.Tensor], weights: list[float], normalize: bool, lam: float = 1.0) -> torch.Tensor:
    """TIES' combination, from the paper and mergekit: γ = sign(Σ wᵢδᵢ) (a zero sum elects +), then
    λ·Σ wᵢδᵢ[sign = γ], divided by Σ wᵢ[sign = γ] when normalize (a zero divisor divides by 1)."""
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *[1] * (stacked.dim() - 1))
    weighted = stacked * w
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (weighted.sign() == elected).to(stacked.dtype)  # a zero entry agrees with neither sign
    merged = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (agree * w).sum(dim=0)
        merged = merged / torch.where(divisor == 0, 1.0, divisor)
    return lam * merged


def float32_inputs(name: str) -> dict[str, torch.Tensor]:
    """The inputs in float32, the fixtures' dtype, in which mergekit computes the merge. The bf16 task vectors
    are exact in float32; the sign of a sum Σ wᵢδᵢ that rounds to near 0 is that of the float32 sum (in
    float64, one entry of the ties fixture elects the other sign)."""
    return {k: v.float() for k, v in tensors(MODELS / name).items()}


def test_ties_gives_the_trimmed_disjoint_mean(tmp_path):
    base, code, math = float32_inputs("base"), float32_inputs("code"), float32_inputs("math")
    out = run_import("ties", tmp_path)
    assert set(out) == set(base)
    entries = differing = 0
    for k in base:
        layer = layer_of(k)
        w_code = gradient([1, 0.7, 0.1], 0.0 if layer is None else layer / (NUM_LAYERS - 1))
        (t_code, tied_code), (t_math, tied_math) = trim(code[k] - base[k], 0.5), trim(math[k] - base[k], 0.7)
        expected = (base[k] + disjoint_mean([t_code, t_math], [w_code, 0.5], normalize=True)).double()
        ok = (out[k] - expected).abs() <= 1e-6 + 1e-5 * expected.abs()
        # The example models are bf16, so many |δᵢ| are equal, also at the cut (about 6% of all entries), and
        # which of those are kept is an implementation's choice. Every entry away from such a tie must match;
        # all but a tiny fraction of all must: mgc's rule (lowest position first, as here) changes none, a
        # choice at random among them (as mergekit's unstable sort may make) about 1.3% on these models.
        stray = ~ok & ~(tied_code | tied_math)
        assert not stray.any(), f"{k}: {int(stray.sum())} entries differ away from a tie at the cut"
        entries, differing = entries + ok.numel(), differing + int((~ok).sum())
    assert differing <= 0.025 * entries, f"{differing} of {entries} entries differ"
    # the weight gradient matters: the last layer's code weight (0.1) is not its first (1)
    name = "model.layers.7.mlp.up_proj.weight"
    assert not torch.allclose(out[name], out[name.replace(".7.", ".0.")])


def test_ties_on_float32_models_without_ties_at_the_cut(tmp_path):
    """The ties fixture's configuration on float32 copies of the models, each moved by a little noise: no two
    |δᵢ| are equal at the cut, so whatever the rule among equal magnitudes, every entry must match."""
    generator = torch.Generator().manual_seed(0)
    models = {}
    for name in ("base", "code", "math"):
        folder = tmp_path / name
        shutil.copytree(MODELS / name, folder)
        for f in folder.glob("*.safetensors"):
            moved = {
                k: v.float() + 1e-4 * torch.randn(v.shape, generator=generator) for k, v in load_file(str(f)).items()
            }
            save_file(moved, str(f))
        models[name] = tensors(folder)
    config = tmp_path / "ties.yml"
    config.write_text(
        (FIXTURES / "ties.yml").read_text().replace("examples/models/", f"{tmp_path.as_posix()}/")
    )
    recipe = tmp_path / "recipe.merge"
    recipe.write_text(import_config(config, output=recipe, root=REPO))
    result = CliRunner().invoke(main, ["run", "-q", str(recipe), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    base, code, math = models["base"], models["code"], models["math"]
    expected = {}
    for k in base:
        layer = layer_of(k)
        w_code = gradient([1, 0.7, 0.1], 0.0 if layer is None else layer / (NUM_LAYERS - 1))
        (t_code, tied_code), (t_math, tied_math) = trim(code[k] - base[k], 0.5), trim(math[k] - base[k], 0.7)
        assert not (tied_code | tied_math).any(), k
        expected[k] = (base[k] + disjoint_mean([t_code, t_math], [w_code, 0.5], normalize=True)).double()
    close({k: v.double() for k, v in tensors(tmp_path / "out").items()}, expected)


def test_dare_ties_at_density_1_is_ties_without_the_trim(tmp_path):
    base, code, math, prose = (float32_inputs(m) for m in ("base", "code", "math", "prose"))

    def merged(k):
        w = [0.6, 0.3 if "mlp" in k else 0.9, 0.45]
        deltas = [code[k] - base[k], math[k] - base[k], prose[k] - base[k]]
        # mergekit's dare_ties default normalize: false (the import gives none, and mgc's default is the same)
        return (base[k] + disjoint_mean(deltas, w, normalize=False, lam=0.8)).double()

    expected = {k: merged(k) for k in base}
    out = run_import("dare_ties_density_1", tmp_path)
    close(out, expected)
    # the same tensors with normalize would differ: the test tells the two apart
    k = "model.layers.3.mlp.up_proj.weight"
    assert not torch.allclose(out[k], base[k].double() + disjoint_mean(
        [code[k] - base[k], math[k] - base[k], prose[k] - base[k]], [0.6, 0.3, 0.45], normalize=True, lam=0.8
    ).double(), rtol=1e-5, atol=1e-6)


# --- refusals, at the YAML's line ------------------------------------------------------------------------

def refuse(tmp_path: Path, text: str) -> MgcError:
    config = tmp_path / "c.yml"
    config.write_text(text)
    with pytest.raises(MgcError) as info:
        import_config(config, output=tmp_path / "r.merge", root=REPO)
    return info.value


def test_unknown_method_is_refused_at_its_line(tmp_path):
    err = refuse(tmp_path, "models:\n  - model: examples/models/code\nmerge_method: frobnicate\n")
    assert (err.span.line, err.span.col) == (3, 15) and "frobnicate" in err.message
    assert str(err.span).endswith("c.yml:3:15")


def test_wildcard_filter_is_refused(tmp_path):
    err = refuse(tmp_path, (
        "models:\n  - model: examples/models/code\n  - model: examples/models/math\nmerge_method: linear\n"
        "parameters:\n  weight:\n    - filter: 'layers.*.mlp'\n      value: 1\n"
    ))
    assert err.span.line == 7 and "substring" in err.message


def test_modules_and_unknown_parameters_are_refused(tmp_path):
    err = refuse(tmp_path, "modules:\n  text: {}\nmerge_method: linear\n")
    assert err.span.line == 1 and "modules" in err.message
    err = refuse(tmp_path, "models:\n  - model: examples/models/code\n    parameters:\n      frob: 1\nmerge_method: linear\n")
    assert (err.span.line, err.span.col) == (4, 7) and "frob" in err.message


def test_bad_yaml_is_located(tmp_path):
    err = refuse(tmp_path, "models: [\nmerge_method: linear\n")
    assert err.span is not None and "YAML" in err.message


def test_hub_ids_and_local_paths(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("models:\n  - model: org/some-model\n  - model: examples/models/code\nmerge_method: linear\n")
    text = import_config(config, output=tmp_path / "sub" / "r.merge", root=REPO)
    assert 'model("hf://org/some-model")' in text
    assert f'model("{os.path.relpath(MODELS / "code", tmp_path / "sub")}")' in text


def test_cli_import(tmp_path, repo_root):
    out = tmp_path / "r.merge"
    result = CliRunner().invoke(main, ["import", "tests/fixtures/mergekit/linear.yml", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "linear(code, math, prose" in out.read_text()
    again = CliRunner().invoke(main, ["import", "tests/fixtures/mergekit/linear.yml", "-o", str(out)])
    assert again.exit_code != 0 and "--force" in again.output


def test_cli_import_to_a_place_it_cannot_write_is_an_error_not_a_traceback(tmp_path, repo_root):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(main, ["import", "tests/fixtures/mergekit/linear.yml", "-o", str(tmp_path / "file" / "r.merge")])
    assert result.exit_code == 1, result.output
    assert "cannot write" in result.output and "Traceback" not in result.output


# --- ramp() with several points, and the hint for a bare list ------------------------------------------

def test_ramp_takes_several_points_on_a_per_model_parameter(tmp_path, repo_root):
    recipe = tmp_path / "r.merge"
    models = os.path.relpath(MODELS, tmp_path)
    recipe.write_text(
        f'base = model("{models}/base")\ncode = model("{models}/code")\nmath = model("{models}/math")\n'
        f"x = task_arithmetic(code, math, base = base, weights = ramp(1, 0.7, 0.1))\nsave x to \"o\"\n"
    )
    model = compile_recipe(recipe).program.saves[0].model
    for layer, want in [(0, 1.0), (7, 0.1), (2, gradient([1, 0.7, 0.1], 2 / 7))]:
        got = model.resolved[f"model.layers.{layer}.mlp.up_proj.weight"].weights
        assert got == pytest.approx([want, want])


def test_a_bare_list_of_the_wrong_length_hints_at_ramp(tmp_path):
    recipe = tmp_path / "r.merge"
    models = os.path.relpath(MODELS, tmp_path)
    recipe.write_text(
        f'base = model("{models}/base")\ncode = model("{models}/code")\nmath = model("{models}/math")\n'
        f"x = task_arithmetic(code, math, base = base, weights = [1, 0.7, 0.1])\nsave x to \"o\"\n"
    )
    with pytest.raises(MgcError) as info:
        compile_recipe(recipe)
    assert "for a gradient across layers, write ramp(1, 0.7, 0.1)" in info.value.hint


def test_parameters_at_every_level_of_slices(tmp_path):
    base, code, math = inputs("base"), inputs("code"), inputs("math")

    def merged(k):
        layer = layer_of(k)
        if layer is not None and layer < 4 or "embed_tokens" in k:  # the first slice (and the embeddings, at t = 0)
            pos = 0.0 if layer is None else layer / 3
            w, lam = [gradient([0.2, 1.0], pos), 0.3 if "mlp" in k else 0.5], 1.0
        else:  # the second slice, and the final norm and head
            w, lam = [0.5, 0.9], 0.7
        return base[k] + lam * (w[0] * (code[k] - base[k]) + w[1] * (math[k] - base[k])) / sum(w)

    close(run_import("task_arithmetic_slices", tmp_path), {k: merged(k) for k in base})


def test_a_one_layer_slice_reads_the_gradients_last_point(tmp_path):
    base, code, math = inputs("base"), inputs("code"), inputs("math")

    def expected(k):
        layer = layer_of(k)
        if layer is None:
            other = code if "embed_tokens" in k else math
            return slerp(0.2, base[k], other[k])
        if layer < 3:
            return slerp(gradient([0.2, 0.6, 0.9], layer / 2), base[k], code[k])
        if layer == 3:
            return slerp(0.9, base[k], code[k])  # t = 1 in mergekit's one-layer slice: the last point, mlp or not
        return slerp(gradient([0.2, 0.6, 0.9], (layer - 4) / 3), base[k], math[k])

    close(run_import("slerp_one_layer_slice", tmp_path), {k: expected(k) for k in base})


# --- the final norm and head from the last slice, named as the architecture names them ---------------------

def tiny_gpt2(folder: Path, seed: int) -> Path:
    """A two-layer GPT-2 (tied head) whose final norm is random, so that two seeds tell it apart."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2,
                                                                 n_positions=32, bos_token_id=1, eos_token_id=2))
    with torch.no_grad():
        model.transformer.ln_f.weight.normal_()
        model.transformer.ln_f.bias.normal_()
    model.save_pretrained(folder)
    return folder


def test_gpt2_slices_take_ln_f_from_the_last_slice(tmp_path):
    a, b = tiny_gpt2(tmp_path / "a", 1), tiny_gpt2(tmp_path / "b", 2)
    config = tmp_path / "gpt2.yml"
    config.write_text("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n"
                      "  - sources:\n      - model: b\n        layer_range: [1, 2]\nmerge_method: passthrough\n")
    recipe = tmp_path / "recipe.merge"
    text = import_config(config, output=recipe, root=tmp_path)
    assert 'with { "transformer.ln_f.bias": b, "transformer.ln_f.weight": b }' in text
    assert "lm_head" not in text and "model.norm" not in text  # tied: its head is the first slice's wte
    recipe.write_text(text)
    compile_recipe(recipe)  # mgc check
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "-q", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got, ta, tb = tensors(out), tensors(a), tensors(b)
    for k in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        assert torch.equal(got[k], tb[k]) and not torch.equal(ta[k], tb[k])
    for k in ("transformer.wte.weight", "transformer.wpe.weight"):  # mergekit's pre_weights: the first slice's
        assert torch.equal(got[k], ta[k])
    assert "lm_head.weight" not in got or torch.equal(got["lm_head.weight"], ta["transformer.wte.weight"])
    assert torch.equal(got["transformer.h.2.mlp.c_fc.weight"], tb["transformer.h.1.mlp.c_fc.weight"])


def test_slices_of_hub_models_name_the_llama_norm_and_head_with_a_comment(tmp_path):
    config = tmp_path / "hub.yml"
    config.write_text("slices:\n  - sources:\n      - model: org/a\n        layer_range: [0, 2]\n"
                      "  - sources:\n      - model: org/b\n        layer_range: [1, 2]\nmerge_method: passthrough\n")
    text = import_config(config, output=tmp_path / "r.merge", root=tmp_path)
    assert 'with { "model.norm": b, lm_head: b }' in text
    assert "# the final norm and head from the last slice, as Llama names them" in text


# --- chat_template: a bundled name, Jinja text, auto ------------------------------------------------------

def chat_config(tmp_path: Path, template: str, models=("a", "b", "c")) -> Path:
    config = tmp_path / "chat.yml"
    config.write_text("models:\n" + "".join(f"  - model: {m}\n" for m in models)
                      + f"merge_method: linear\nchat_template: {template}\n")
    return config


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_a_bundled_chat_template_name_is_refused_naming_its_file(tmp_path, name):
    with pytest.raises(MgcError) as e:
        import_config(chat_config(tmp_path, name), output=tmp_path / "r.merge", root=tmp_path)
    assert f"chat_templates/{name}.jinja" in str(e.value) and "chat_template = \"...\"" in str(e.value)


def test_a_chat_template_neither_named_nor_jinja_is_refused(tmp_path):
    with pytest.raises(MgcError, match="neither one of mergekit's bundled templates"):
        import_config(chat_config(tmp_path, "vicuna"), output=tmp_path / "r.merge", root=tmp_path)


def test_chat_template_text_is_kept(tmp_path):
    text = import_config(chat_config(tmp_path, "'{% for m in messages %}{{ m.content }}{% endfor %}'"),
                         output=tmp_path / "r.merge", root=tmp_path)
    assert 'chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"' in text


def test_auto_chat_template_names_a_model_with_the_most_common_one(tmp_path):
    pytest.importorskip("transformers")
    from tiny_lms import TEMPLATE, llama

    other = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    llama(tmp_path / "a", 1, template=other)
    llama(tmp_path / "b", 2, template=TEMPLATE)
    llama(tmp_path / "c", 3, template=TEMPLATE + "\n")  # mergekit compares the stripped texts
    recipe = tmp_path / "r.merge"
    text = import_config(chat_config(tmp_path, "auto"), output=recipe, root=tmp_path)
    assert 'save merged to "merged" { chat_template = b }' in text
    recipe.write_text(text)
    compile_recipe(recipe)
    llama(tmp_path / "d", 4)  # no template: skipped, as mergekit skips it
    with pytest.raises(MgcError, match="equally common"):  # one each of two templates: mergekit's pick is a set's order
        import_config(chat_config(tmp_path, "auto", ("a", "b", "d")), output=recipe, root=tmp_path)
    text = import_config(chat_config(tmp_path, "auto", ("d", "d")), output=recipe, root=tmp_path)
    assert "chat_template =" not in text and "# left out, changes no number in mgc: chat_template: auto" in text


def test_auto_chat_template_of_a_hub_model_is_refused(tmp_path):
    with pytest.raises(MgcError, match="cannot read the template of 'org/a'"):
        import_config(chat_config(tmp_path, "auto", ("org/a", "org/b")), output=tmp_path / "r.merge", root=tmp_path)


def test_cli_import_of_a_file_that_is_not_text_is_an_error_not_a_traceback(tmp_path):
    config = tmp_path / "c.yml"
    config.write_bytes(b"\xff\xfe\x00merge_method: linear\n")
    result = CliRunner().invoke(main, ["import", str(config)])
    assert result.exit_code == 1, result.output
    assert "not UTF-8" in result.output and "Traceback" not in result.output


def test_mutated_configs_give_errors_never_tracebacks(repo_root):
    """Random edits of the fixtures: the importer either translates them or raises an MgcError."""
    import random

    fixtures = sorted((repo_root / "tests" / "fixtures" / "mergekit").glob("*.yml"))
    r = random.Random(int(os.environ.get("MGC_FUZZ_SEED", "1")))
    words = [":", "-", " ", "\n", "[", "]", "{", "}", "0.5", "[1, 0.7]", "null", "true", "weight", "density",
             "layer_range", "model", "sources", "slices", "parameters", "filter", "value", "&a", "*a", "'x'",
             "1e400", "-1", "name"]
    for _ in range(300):
        text = r.choice(fixtures).read_text()
        for _ in range(r.randint(1, 4)):
            k, op = r.randrange(len(text) + 1), r.random()
            if op < 0.4:
                text = text[:k] + r.choice(words) + text[k:]
            elif op < 0.7:
                text = text[:k] + text[k + r.randint(1, 8):]
            else:
                j = r.randrange(len(text) + 1)
                text = text[:k] + text[j:j + r.randint(1, 20)] + text[k:]
        try:
            import_config(repo_root / "tests" / "fixtures" / "mergekit" / "mutated.yml", text=text)
        except MgcError:
            pass
