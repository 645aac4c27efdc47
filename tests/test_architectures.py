"""Any architecture, its layers found from the config and the tensor names: mixture-of-experts models (Mixtral,
Qwen2-MoE, DeepSeek-V3), Phi-3's fused projections and GPT-2's Conv1D blocks, built tiny with transformers' own
config classes, merged, every tensor checked against an independent computation, every output loaded."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

from mgc.api import compile_recipe, run
from mgc.core.errors import RecipeTypeError
from conftest import load_folder

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)
LAYERS = 3


def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **TEXT, num_hidden_layers=LAYERS, num_local_experts=4, num_experts_per_tok=2))


def _qwen2_moe(step: int = 1, layers: int = LAYERS):
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **TEXT, num_hidden_layers=layers, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
        shared_expert_intermediate_size=16, decoder_sparse_step=step))


def _phi3():
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**TEXT, num_hidden_layers=LAYERS, pad_token_id=0))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=LAYERS, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0))


def _deepseek():
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **TEXT, num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, n_shared_experts=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1))


ARCHS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "phi3": _phi3, "gpt2": _gpt2}
# the layer index, independently of mgc: the number after the block word (never an expert's number)
LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archs")
    for k, (name, make) in enumerate(ARCHS.items()):
        for j in range(2):
            torch.manual_seed(100 * k + j)
            make().save_pretrained(root / f"{name}{j}")
    torch.manual_seed(7)
    _qwen2_moe(step=2, layers=4).save_pretrained(root / "qwen_step2")
    torch.manual_seed(8)
    _deepseek().save_pretrained(root / "deepseek")
    return root


def _run(zoo: Path, tmp_path: Path, body: str):
    recipe = tmp_path / "r.merge"
    recipe.write_text(textwrap.dedent(body).replace("ZOO", str(zoo)))
    return run(recipe, device="cpu")



def _loads(folder: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    logits = model(torch.tensor([[1, 5, 9, 42, 7]])).logits
    assert torch.isfinite(logits).all()
    return model


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Shoemake's slerp on the flattened tensors, in float64, lerp where they are nearly parallel (a zero tensor
    is not normalised, as mergekit)."""
    x, y = a.double().flatten(), b.double().flatten()
    nx, ny = (float(v.norm()) if float(v.norm()) > 1e-8 else 1.0 for v in (x, y))
    cos = float(x @ y) / (nx * ny)
    if abs(cos) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        theta = torch.acos(torch.tensor(cos, dtype=torch.float64))
        out = (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)
    return out.reshape(a.shape)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_slerp_with_a_gradient_reads_the_layer_index(arch, zoo, tmp_path):
    _run(zoo, tmp_path, f"""
        a = model("ZOO/{arch}0")
        b = model("ZOO/{arch}1")
        save slerp(a, b, t = [0, 1]) to "out" {{ dtype = fp32 }}
    """)
    got, a, b = load_folder(tmp_path / "out"), load_folder(zoo / f"{arch}0"), load_folder(zoo / f"{arch}1")
    assert got.keys() == a.keys()
    experts = [n for n in got if ".experts." in n]
    assert bool(experts) == (arch in ("mixtral", "qwen2_moe"))
    for name in got:
        m = LAYER.search(name)
        t = int(m.group(1)) / (LAYERS - 1) if m else 0.0
        want = _slerp(t, a[name], b[name])
        assert torch.allclose(got[name].double(), want, atol=1e-6, rtol=1e-5), (name, t)
        if t == 0:
            assert torch.equal(got[name], a[name].float()), name
    # an expert numbered above the last layer still reads its layer's t: layer 0 expert 3 is model a's
    if experts:
        name = next(n for n in experts if n.startswith("model.layers.0.") and ".experts.3." in n)
        assert torch.equal(got[name], a[name].float())
    _loads(tmp_path / "out")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_linear_stack_and_layer_selectors(arch, zoo, tmp_path):
    _run(zoo, tmp_path, f"""
        a = model("ZOO/{arch}0")
        b = model("ZOO/{arch}1")
        save linear(a, b, weights = [1, 3]) to "lin" {{ dtype = fp32 }}
        save stack(a.layers[0:2], b.layers[1:3], a.layers[2:3]) to "tall"
        save a with {{ layers[1:2]: b }} to "with"
        save slerp(a, b, t = {{ layers[2:]: 1, _: 0 }}) to "table"
    """)
    a, b = load_folder(zoo / f"{arch}0"), load_folder(zoo / f"{arch}1")

    lin = load_folder(tmp_path / "lin")
    for name in lin:  # term by term in float32, then divided by the sum of the weights, as mgc computes it
        assert torch.equal(lin[name], (a[name].float() * 1.0 + b[name].float() * 3.0) / 4.0), name

    def layer(name):
        m = LAYER.search(name)
        return int(m.group(1)) if m else None

    def renamed(name, i):
        m = LAYER.search(name)
        return name[:m.start(1)] + str(i) + name[m.end(1):]

    tall = load_folder(tmp_path / "tall")
    sources = [(a, 0), (a, 1), (b, 1), (b, 2), (a, 2)]
    assert {layer(n) for n in tall} - {None} == set(range(5))
    for name in tall:
        i = layer(name)
        source, src = (a, name) if i is None else (sources[i][0], renamed(name, sources[i][1]))
        assert torch.equal(tall[name], source[src]), name
    config = json.loads((tmp_path / "tall" / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == 5
    assert len([n for n in tall if ".experts." in n]) == len([n for n in a if ".experts." in n]) * 5 // LAYERS

    for out, pick in (("with", lambda i: i == 1), ("table", lambda i: i is not None and i >= 2)):
        got = load_folder(tmp_path / out)
        for name in got:
            assert torch.equal(got[name], (b if pick(layer(name)) else a)[name]), (out, name)
    for out in ("lin", "tall", "with", "table"):
        _loads(tmp_path / out)


def test_a_stack_of_alternating_dense_and_expert_layers_restates_the_sparse_step(zoo, tmp_path):
    """Qwen2-MoE with decoder_sparse_step = 2: layers 1 and 3 have experts. Reordered, the step cannot say which
    do, so the output states step 1 and lists its dense layers."""
    _run(zoo, tmp_path, """
        q = model("ZOO/qwen_step2")
        save stack(q.layers[1:2], q.layers[0:1], q.layers[3:4], q.layers[3:4], q.layers[2:3]) to "out"
    """)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == [1, 4]
    model = _loads(tmp_path / "out")
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == [
        "Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP", "Qwen2MoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP"]


def test_dense_layers_first_restates_first_k_dense_replace(zoo, tmp_path):
    _run(zoo, tmp_path, """
        d = model("ZOO/deepseek")
        save stack(d.layers[0:1], d.layers[2:4], d.layers[3:4]) to "out"
    """)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["first_k_dense_replace"] == 1 and config["num_hidden_layers"] == 4
    _loads(tmp_path / "out")


@pytest.mark.parametrize("parts, words", [
    ("d.layers[2:4], d.layers[0:2]", "output layer 2 is a dense layer after a mixture-of-experts layer"),
])
def test_a_stack_its_config_cannot_describe_is_an_error(zoo, tmp_path, parts, words):
    with pytest.raises(RecipeTypeError) as info:
        compile_recipe(tmp_path / "r.merge", text=f'd = model("{zoo}/deepseek")\nsave stack({parts}) to "out"\n')
    assert words in info.value.message and info.value.span.line == 2 and info.value.hint


def test_layers_of_another_kind_at_an_undescribed_position_are_an_error(zoo, tmp_path, monkeypatch):
    """Without a rule mgc knows (here DeepSeek's, taken away), a layer must keep the kind of its position."""
    from mgc.compiler import layer_kinds

    monkeypatch.setattr(layer_kinds, "FIRST_DENSE", "no_such_key")
    text = f'd = model("{zoo}/deepseek")\nsave stack(d.layers[0:2], d.layers[3:4], d.layers[2:3]) to "out"\n'
    compile_recipe(tmp_path / "r.merge", text=text)  # each layer at a position of its kind: fine
    with pytest.raises(RecipeTypeError, match="output layer 1 is layer 2 of this part"):
        compile_recipe(tmp_path / "r.merge", text=text.replace("d.layers[0:2]", "d.layers[0:1], d.layers[2:3]"))
