"""Norm weights stored around 0 and applied as 1 + w (Gemma and kin): operators that do not commute with a shift
merge 1 + w and take 1 off after; the others merge the stored weights, bit for bit as before. Which tensors
these are is checked against transformers' own modules; which operators commute, against their math."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import call_merge
from mgc.api import compile_recipe, run
from mgc.compiler.ir import Apply
from mgc.compiler.norm_offsets import stored_offset
from mgc.stdlib import OPERATORS
from conftest import load_folder

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
              patch_size=4)
NORM = "model.layers.1.input_layernorm.weight"


# --- which tensors: the rule against the modules ------------------------------------------------------------


def _families():
    """(label, model) of every family the rule knows, and of some it must leave alone."""
    t = transformers
    yield "gemma", t.GemmaForCausalLM(t.GemmaConfig(**TEXT, num_hidden_layers=1, head_dim=8))
    yield "gemma2", t.Gemma2ForCausalLM(t.Gemma2Config(**TEXT, num_hidden_layers=1, head_dim=8))
    yield "gemma3_text", t.Gemma3ForCausalLM(t.Gemma3TextConfig(**TEXT, num_hidden_layers=1, head_dim=8))
    yield "gemma3", t.Gemma3ForConditionalGeneration(t.Gemma3Config(
        text_config=dict(TEXT, num_hidden_layers=1, head_dim=8), vision_config=VISION, mm_tokens_per_image=4,
        image_token_index=63, boi_token_index=61, eoi_token_index=62))
    yield "paligemma", t.PaliGemmaForConditionalGeneration(t.PaliGemmaConfig(
        text_config=dict(TEXT, num_hidden_layers=1, head_dim=8, model_type="gemma"), vision_config=VISION,
        image_token_index=63, projection_dim=16))
    yield "recurrent_gemma", t.RecurrentGemmaForCausalLM(t.RecurrentGemmaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=3, lru_width=16, attention_window_size=8, conv1d_width=2, head_dim=8))
    yield "vaultgemma", t.VaultGemmaForCausalLM(t.VaultGemmaConfig(**TEXT, num_hidden_layers=1, head_dim=8))
    yield "nemotron", t.NemotronForCausalLM(t.NemotronConfig(**TEXT, num_hidden_layers=1, head_dim=8))
    yield "qwen3_next", t.Qwen3NextForCausalLM(t.Qwen3NextConfig(
        **TEXT, num_hidden_layers=2, head_dim=8, layer_types=["linear_attention", "full_attention"], num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=8, shared_expert_intermediate_size=8, linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8))
    yield "llama", t.LlamaForCausalLM(t.LlamaConfig(**TEXT, num_hidden_layers=1))
    yield "gemma3n", t.Gemma3nForCausalLM(t.Gemma3nTextConfig(
        **TEXT, num_hidden_layers=1, head_dim=8, hidden_size_per_layer_input=4, vocab_size_per_layer_input=64,
        laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0], num_kv_shared_layers=0))


def _zero_centred(module: torch.nn.Module) -> bool:
    """Whether a norm passes signal with its weight (and bias) at 0, i.e. applies 1 + w."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.zero_()
        x = torch.randn(2, 3, module.weight.shape[0])
        try:
            y = module(x)
        except TypeError:  # a gated norm: forward(x, gate)
            y = module(x, torch.randn_like(x))
    return bool((y[0] if isinstance(y, tuple) else y).abs().max() > 0)


# how saved names of the vision-language models map onto module names in transformers 5
SAVED_TO_MODULE = (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                   ("multi_modal_projector.", "model.multi_modal_projector."))


def _saved(model, folder: Path) -> tuple[dict, list[str]]:
    model.save_pretrained(folder)
    names = []
    for f in folder.glob("*.safetensors"):
        names += list(load_file(f))
    return json.loads((folder / "config.json").read_text()), names


@pytest.mark.parametrize("label, model", list(_families()), ids=lambda v: v if isinstance(v, str) else "")
def test_the_offset_rule_marks_exactly_the_norms_applied_as_one_plus_w(label, model, tmp_path):
    torch.manual_seed(0)
    config, names = _saved(model, tmp_path / label)
    modules = dict(model.named_modules())
    checked = 0
    for name in names:
        module_name = name.removesuffix(".weight")
        for saved, live in SAVED_TO_MODULE:
            if module_name not in modules and module_name.startswith(saved):
                module_name = live + module_name[len(saved):]
        module = modules.get(module_name)
        if not name.endswith(".weight") or module is None or list(module.children()):
            continue
        if isinstance(module, torch.nn.Embedding) or getattr(module, "weight", None) is None or module.weight.dim() != 1:
            continue
        checked += 1
        assert stored_offset(config, name) == (1.0 if _zero_centred(module) else 0.0), (label, name)
    assert checked >= 3
    if label in ("llama", "gemma3n"):
        assert not any(stored_offset(config, n) for n in names)


# --- what is merged ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemmas(tmp_path_factory) -> Path:
    """Two Gemma 2 models (and a base) whose norm weights are spread around 0, as trained ones are."""
    root = tmp_path_factory.mktemp("gemma")
    for k, name in enumerate(("a", "b", "base")):
        torch.manual_seed(50 + k)
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**TEXT, num_hidden_layers=3, head_dim=8))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.normal_(0.0, 0.2)
        model.save_pretrained(root / name)
    return root


def _run(root: Path, tmp_path: Path, body: str, **kwargs):
    recipe = tmp_path / "r.merge"
    recipe.write_text(textwrap.dedent(body).replace("ZOO", str(root)))
    return run(recipe, device="cpu", **kwargs)



def _slerp(t: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double(), y.double()
    theta = torch.acos((x @ y) / (x.norm() * y.norm()))
    return (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)


def test_slerp_of_gemma_norms_is_the_slerp_of_their_gains(gemmas, tmp_path):
    _run(gemmas, tmp_path, """
        a = model("ZOO/a")
        b = model("ZOO/b")
        save slerp(a, b, t = [0, 0.3, 0.8]) to "out" { dtype = fp32 }
    """)
    got, a, b = load_folder(tmp_path / "out"), load_folder(gemmas / "a"), load_folder(gemmas / "b")
    norms = [n for n in got if n.endswith("norm.weight")]
    assert len(norms) == 3 * 4 + 1
    for name in norms:
        t = {"0": 0.0, "1": 0.3, "2": 0.8}.get(name.split(".")[2], 0.0) if ".layers." in name else 0.0
        want = _slerp(t, a[name] + 1, b[name] + 1) - 1  # the gain 1 + w is what slerp acts on
        assert torch.allclose(got[name].double(), want, atol=3e-7, rtol=0), name
        if t == 0:  # slerp at t = 0 is the first model exactly, offset or not
            assert torch.equal(got[name], a[name])
        else:
            assert not torch.allclose(got[name].double(), _slerp(t, a[name], b[name]), atol=1e-3)
    name = "model.layers.1.mlp.up_proj.weight"  # other tensors: slerp as stored
    assert torch.allclose(got[name].double(), _slerp(0.3, a[name].flatten(), b[name].flatten()).reshape(a[name].shape),
                          atol=1e-6)


def test_linear_of_gemma_norms_is_unchanged_bit_for_bit(gemmas, tmp_path):
    _run(gemmas, tmp_path, """
        a = model("ZOO/a")
        b = model("ZOO/b")
        base = model("ZOO/base")
        save linear(a, b, weights = [0.3, 0.7]) to "lin" { dtype = fp32 }
        save linear(a, b, weights = [0.25, 0.5], normalize = false) to "sum" { dtype = fp32 }
        save task_arithmetic(a, b, base = base) to "ta" { dtype = fp32 }
    """)
    a, b, base = load_folder(gemmas / "a"), load_folder(gemmas / "b"), load_folder(gemmas / "base")
    lin, ta = load_folder(tmp_path / "lin"), load_folder(tmp_path / "ta")
    for name in lin:  # as mgc's linear always computes it: term by term in float32, then / Σ w
        assert torch.equal(lin[name], (a[name] * 0.3 + b[name] * 0.7) / 1.0), name
    # task arithmetic on the stored weights: the same bytes as for any other tensor
    assert torch.equal(ta[NORM], base[NORM] + ((a[NORM] - base[NORM]) + (b[NORM] - base[NORM])))
    # weights summing to 0.75 without normalize: Σ wᵢ(1 + wᵢ) − 1 ≠ Σ wᵢwᵢ, so the gains are combined
    got = load_folder(tmp_path / "sum")[NORM].double()
    assert torch.allclose(got, 0.25 * (a[NORM].double() + 1) + 0.5 * (b[NORM].double() + 1) - 1, atol=3e-7)


@pytest.mark.parametrize("expr, offset", [
    ("slerp(a, b, t = 0.5)", 1.0), ("slerp(a, b, t = 0)", 0.0), ("karcher(a, b)", 1.0), ("karcher(a)", 0.0),
    ("multislerp(a, b)", 1.0), ("multislerp(a, b, base = base)", 0.0), ("nuslerp(a, b)", 1.0),
    ("nuslerp(a, b, base = base)", 0.0), ("model_stock(a, b, base = base)", 0.0), ("linear(a, b)", 0.0),
    ("linear(a, b, normalize = false)", 1.0), ("passthrough(a, scale = 2)", 1.0), ("passthrough(a)", 0.0),
    ("ties(a, b, base = base)", 0.0), ("nearswap(a, base = base, t = 0.1)", 0.0),
])
def test_the_offset_follows_the_operator_and_its_parameters(gemmas, tmp_path, expr, offset):
    text = f'a = model("{gemmas}/a")\nb = model("{gemmas}/b")\nbase = model("{gemmas}/base")\nsave {expr} to "o"\n'
    plan = compile_recipe(tmp_path / "r.merge", text=text, optimize_graph=False)
    (found,) = {plan.graph.payload(n).offset for n in plan.graph.of_kind(Apply) if plan.graph.payload(n).tensor == NORM}
    assert found == offset
    others = {plan.graph.payload(n).offset for n in plan.graph.of_kind(Apply) if "norm" not in plan.graph.payload(n).tensor}
    assert others == {0.0}


def test_the_optimizer_keeps_the_bytes_with_offsets(gemmas, tmp_path):
    from mgc.runtime.execute import execute

    body = (f'a = model("{gemmas}/a")\nb = model("{gemmas}/b")\n'
            'save slerp(a, b, t = [0, 1]) to "g" { dtype = fp32 }\nsave slerp(a, b, t = 0.4) to "h" { dtype = fp32 }\n'
            'save karcher(slerp(a, b, t = 0.4), b) to "k" { dtype = fp32 }\n')
    out = {}
    for optimize in (True, False):
        plan = compile_recipe(tmp_path / "r.merge", text=body, output=tmp_path / str(optimize), optimize_graph=optimize)
        execute(plan, device="cpu", progress=False)
        out[optimize] = {f"{d.name}/{k}": v for d in (tmp_path / str(optimize)).iterdir() for k, v in load_folder(d).items()}
    assert out[True].keys() == out[False].keys()
    assert all(torch.equal(out[True][k], out[False][k]) for k in out[True])


def test_a_merged_gemma_loads(gemmas, tmp_path):
    _run(gemmas, tmp_path, 'a = model("ZOO/a")\nb = model("ZOO/b")\nsave karcher(a, b) to "out"\n')
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# --- which operators commute with a shift: the declaration against the math ------------------------------------


def _call(name: str, shift: float, with_base: bool) -> torch.Tensor:
    op = OPERATORS[name]
    g = torch.Generator().manual_seed(3)
    n = op.max_models if op.max_models is not None else max(op.min_models, 3)
    models = [torch.randn(6, 40, generator=g) * 0.3 + shift for _ in range(n)]
    base = torch.randn(6, 40, generator=g) * 0.3 + shift if with_base else None
    params = op.params(**{"slerp": {"t": 0.3}, "nearswap": {"t": 0.1}}.get(name, {}))
    aux = {}
    if "fisher" in op.required_model_params:
        aux["fisher"] = [torch.rand(6, 40, generator=g) for _ in range(n)]
    generator = torch.Generator().manual_seed(9) if op.random else None
    return call_merge(op, models, params, base, generator=generator, **aux)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_shift_equivariant_is_declared_truthfully(name):
    op = OPERATORS[name]
    for with_base in {"none": [False], "optional": [False, True], "required": [True]}[op.base]:
        params = op.params(**{"slerp": {"t": 0.3}, "nearswap": {"t": 0.1}}.get(name, {}))
        declared = op.commutes_with_shift(params, with_base)
        plain, shifted = _call(name, 0.0, with_base), _call(name, 1.0, with_base)
        error = float((shifted - 1.0 - plain).abs().max())
        assert (error < 1e-4) == declared, (name, with_base, error)
