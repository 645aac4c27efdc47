"""Layer stacks, configs that follow their tensors, and the output dtype, on small models made with
transformers' own config classes (Llama, Gemma 2, Llava, Qwen2-VL)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from mgc.api import compile_recipe, run
from mgc.core.errors import CheckpointError, MgcError, RecipeTypeError
from mgc.compiler.layers import layer_map
from conftest import load_folder

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)


def _save(model, folder: Path, dtype=None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    return folder


def _llama(folder: Path, layers: int, seed: int, dtype=None) -> Path:
    torch.manual_seed(seed)
    return _save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT, num_hidden_layers=layers)), folder, dtype)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    _llama(root / "a", 4, 0)
    _llama(root / "b", 4, 1)
    _llama(root / "d", 6, 2)
    _llama(root / "platy", 6, 3)
    _llama(root / "a16", 4, 4, torch.float16)
    _llama(root / "abf", 4, 5, torch.bfloat16)
    _llama(root / "a64", 4, 7, torch.float64)
    torch.manual_seed(6)
    gemma = transformers.Gemma2Config(**TEXT, num_hidden_layers=4, head_dim=8)
    assert gemma.layer_types == ["sliding_attention", "full_attention"] * 2
    _save(transformers.Gemma2ForCausalLM(gemma), root / "gemma")
    for k in range(2):
        torch.manual_seed(10 + k)
        llava = transformers.LlavaConfig(
            text_config=transformers.LlamaConfig(**TEXT, num_hidden_layers=4),
            vision_config=transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                                        num_attention_heads=2, image_size=8, patch_size=4),
            image_token_index=63,
        )
        _save(transformers.LlavaForConditionalGeneration(llava), root / f"llava{k}")
        torch.manual_seed(20 + k)
        qwen = transformers.Qwen2VLConfig(
            text_config=dict(TEXT, num_hidden_layers=4, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                             bos_token_id=0, eos_token_id=1),
            vision_config=dict(depth=2, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2,
                               temporal_patch_size=1, spatial_merge_size=1, in_chans=3),
        )
        _save(transformers.Qwen2VLForConditionalGeneration(qwen), root / f"qwen{k}")
    return root


def _run(zoo: Path, tmp_path: Path, body: str):
    recipe = tmp_path / "r.merge"
    recipe.write_text(textwrap.dedent(body).replace("ZOO", str(zoo)).replace("OUT", str(tmp_path / "out")))
    return run(recipe, device="cpu")



def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --- configs follow their tensors ---------------------------------------------------------------


@pytest.mark.parametrize("expr", [
    "linear(stack(a.layers[0:4], d.layers[4:6]), d)",
    'stack(a.layers[0:4], d.layers[4:6]) with { "lm_head.weight": platy }',
    "slerp(d, stack(a.layers[0:4], d.layers[4:6]), t = 0.5)",
])
def test_an_operator_or_with_over_a_stack_keeps_the_stack_s_layer_count(zoo, tmp_path, expr):
    _run(zoo, tmp_path, f"""
        a = model("ZOO/a")
        d = model("ZOO/d")
        platy = model("ZOO/platy")
        save {expr} to "OUT"
    """)
    out = tmp_path / "out"
    assert _config(out)["num_hidden_layers"] == 6
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    saved = load_folder(out)["model.layers.5.mlp.up_proj.weight"]
    assert torch.equal(model.model.layers[5].mlp.up_proj.weight.data, saved.to(model.dtype))


def test_stack_follows_each_output_layer_s_source_in_layer_types(zoo, tmp_path):
    _run(zoo, tmp_path, """
        g = model("ZOO/gemma")
        save stack(g.layers[1:2], g.layers[0:1], g.layers[1:4]) to "OUT"
    """)
    config = _config(tmp_path / "out")
    assert config["num_hidden_layers"] == 5
    # source layers 1, 0, 1, 2, 3
    assert config["layer_types"] == ["full_attention", "sliding_attention", "full_attention", "sliding_attention",
                                     "full_attention"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.layer_types == config["layer_types"]


def test_stack_of_a_vision_language_model_updates_the_nested_text_config(zoo, tmp_path):
    _run(zoo, tmp_path, """
        v = model("ZOO/llava0")
        w = model("ZOO/llava1")
        save stack(v.layers[0:3], w.layers[1:4]) to "OUT"
    """)
    out = tmp_path / "out"
    config = _config(out)
    assert config["text_config"]["num_hidden_layers"] == 6
    assert config["vision_config"]["num_hidden_layers"] == 3  # the vision tower is not the stacked one
    tensors = load_folder(out)
    assert {int(n.split(".")[3]) for n in tensors if n.startswith("language_model.model.layers.")} == set(range(6))
    assert torch.equal(tensors["language_model.model.layers.5.mlp.up_proj.weight"],
                       load_folder(zoo / "llava1")["language_model.model.layers.3.mlp.up_proj.weight"])
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.num_hidden_layers == 6


def test_a_save_whose_config_would_not_describe_its_tensors_is_refused(zoo, tmp_path, monkeypatch):
    """The guard at every save: whatever computes a config, one that disagrees with the tensors is an error."""
    from mgc.compiler import values

    monkeypatch.setattr(values.StackModel, "config", lambda self: self.parts[0].model.config())
    with pytest.raises(RecipeTypeError, match="num_hidden_layers = 4, but the tensors hold layers 0..5"):
        _run(zoo, tmp_path, 'a = model("ZOO/a")\nd = model("ZOO/d")\nsave stack(a.layers[0:4], d.layers[4:6]) to "OUT"\n')


# --- layers found from the config and the names -------------------------------------------------


def test_a_gradient_reaches_the_layers_of_a_vision_language_model(zoo, tmp_path):
    _run(zoo, tmp_path, """
        a = model("ZOO/llava0")
        b = model("ZOO/llava1")
        save slerp(a, b, t = [0, 1]) to "OUT"
    """)
    got, a, b = load_folder(tmp_path / "out"), load_folder(zoo / "llava0"), load_folder(zoo / "llava1")
    last_text = "language_model.model.layers.3.mlp.up_proj.weight"
    assert torch.equal(got[last_text], b[last_text])  # t = 1 at the last language layer
    first_text = "language_model.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[first_text], a[first_text])
    last_vision = next(n for n in got if n.startswith("vision_tower.") and ".layers.2." in n and n.endswith("fc1.weight"))
    assert torch.equal(got[last_vision], b[last_vision])  # the vision tower's own depth: layer 2 of 3 reads t = 1
    assert not all(torch.equal(got[n], a[n]) for n in got)


def test_a_gradient_on_a_tensor_mgc_cannot_place_is_an_error(zoo, tmp_path):
    body = """
        a = model("ZOO/qwen0")
        b = model("ZOO/qwen1")
        save slerp(a, b, t = [0, 1]) to "OUT"
    """
    with pytest.raises(RecipeTypeError) as info:
        _run(zoo, tmp_path, body)
    err = info.value
    assert "visual.merger.mlp.0" in err.message and "cannot place" in err.message
    assert err.span.line == 4 and 'visual.merger.mlp' in err.hint
    assert not (tmp_path / "out").exists()


def test_a_table_gives_unplaced_tensors_their_own_value(zoo, tmp_path):
    _run(zoo, tmp_path, """
        a = model("ZOO/qwen0")
        b = model("ZOO/qwen1")
        save slerp(a, b, t = { "visual.merger": 1, _: [0, 1] }) to "OUT"
    """)
    got, a, b = load_folder(tmp_path / "out"), load_folder(zoo / "qwen0"), load_folder(zoo / "qwen1")
    assert torch.equal(got["visual.merger.mlp.0.weight"], b["visual.merger.mlp.0.weight"])
    blocks = sorted(n for n in got if n.startswith("visual.blocks.1.") and n.endswith("weight"))
    assert blocks and all(torch.equal(got[n], b[n]) for n in blocks)  # vision block 1 of 2 reads t = 1
    first = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[first], a[first])


def test_a_layer_selector_on_a_tensor_mgc_cannot_place_is_an_error(zoo, tmp_path):
    with pytest.raises(RecipeTypeError, match="cannot tell whether tensor 'visual.merger.mlp.0"):
        _run(zoo, tmp_path, 'a = model("ZOO/qwen0")\nb = model("ZOO/qwen1")\nsave a with { layers[0:2]: b } to "OUT"\n')


def test_layer_selectors_address_the_language_model(zoo, tmp_path):
    _run(zoo, tmp_path, 'a = model("ZOO/llava0")\nb = model("ZOO/llava1")\nsave a with { layers[3:]: b } to "OUT"\n')
    got, a, b = load_folder(tmp_path / "out"), load_folder(zoo / "llava0"), load_folder(zoo / "llava1")
    for name in got:
        source = b if name.startswith("language_model.model.layers.3.") else a
        assert torch.equal(got[name], source[name]), name


def test_a_config_layer_count_that_disagrees_with_the_tensors_is_an_error(zoo, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(zoo / "a", bad)
    config = _config(bad)
    config["num_hidden_layers"] = 6
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        compile_recipe(tmp_path / "r.merge", text=f'a = model("{bad}")\nsave a to "{tmp_path}/o"\n')
    assert "num_hidden_layers = 6" in info.value.message and "layers 0..3" in info.value.message
    assert info.value.span is not None and info.value.span.line == 1


def test_a_stack_with_a_missing_layer_is_an_error(tmp_path):
    names = [f"model.layers.{i}.w" for i in (0, 1, 3)]
    with pytest.raises(CheckpointError, match="no tensors for layer 2"):
        layer_map({"num_hidden_layers": 4}, names, "ckpt")


# --- one output dtype -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", [("a16", "abf", "a"), ("a", "a16", "abf"), ("abf", "a", "a16")])
def test_without_dtype_the_output_dtype_does_not_depend_on_argument_order(zoo, tmp_path, order):
    body = "".join(f'{n} = model("ZOO/{n}")\n' for n in ("a", "a16", "abf"))
    plan, _ = _run(zoo, tmp_path, body + f'save linear({", ".join(order)}) to "OUT"\n')
    assert {t.dtype for t in load_folder(tmp_path / "out").values()} == {torch.float32}
    assert _config(tmp_path / "out")["torch_dtype"] == "float32"
    (warning,) = plan.program.warnings
    assert "different dtypes" in warning.message and "float32" in warning.message


def test_a_stack_of_two_dtypes_is_saved_in_one(zoo, tmp_path):
    plan, _ = _run(zoo, tmp_path, 'x = model("ZOO/a16")\ny = model("ZOO/abf")\nsave stack(x.layers[0:2], y.layers[2:4]) to "OUT"\n')
    assert {t.dtype for t in load_folder(tmp_path / "out").values()} == {torch.float32}
    assert len(plan.program.warnings) == 1


def test_a_float64_output_says_float64_in_its_config(zoo, tmp_path):
    """The config's dtype follows the tensors written, float64 included (it used to keep the first input's)."""
    _run(zoo, tmp_path, 'x = model("ZOO/abf")\ny = model("ZOO/a64")\nsave linear(x, y) to "OUT"\n')
    assert {t.dtype for t in load_folder(tmp_path / "out").values()} == {torch.float64}
    assert _config(tmp_path / "out")["torch_dtype"] == "float64"


def test_inputs_that_agree_keep_their_dtype_without_a_warning(zoo, tmp_path):
    plan, _ = _run(zoo, tmp_path, 'x = model("ZOO/abf")\nsave slerp(x, x, t = 0.5) to "OUT"\n')
    assert {t.dtype for t in load_folder(tmp_path / "out").values()} == {torch.bfloat16}
    assert _config(tmp_path / "out")["torch_dtype"] == "bfloat16"
    assert plan.program.warnings == []


def test_the_command_line_reports_the_dtype_warning(zoo, tmp_path):
    from click.testing import CliRunner

    from mgc.cli import main

    recipe = tmp_path / "r.merge"
    recipe.write_text(f'x = model("{zoo}/a16")\ny = model("{zoo}/abf")\nsave linear(x, y) to "{tmp_path}/o"\n')
    for command in ("check", "plan"):
        result = CliRunner().invoke(main, [command, str(recipe)])
        assert result.exit_code == 0
        assert f"{recipe}:3:1: warning: the inputs of this save are stored in different dtypes" in result.output


def test_the_vision_tower_is_addressed_by_name(zoo, tmp_path):
    """layers[a:b] is the language model's; a glob on the name reaches the vision tower's blocks."""
    _run(zoo, tmp_path, """
        a = model("ZOO/llava0")
        b = model("ZOO/llava1")
        save a with { "vision_tower.*.layers.[0-1].*": b, layers[0:1]: b } to "OUT"
    """)
    got, a, b = load_folder(tmp_path / "out"), load_folder(zoo / "llava0"), load_folder(zoo / "llava1")
    vision = [n for n in got if n.startswith("vision_tower.") and ".encoder.layers." in n]
    assert any(".layers.2." in n for n in vision)  # the tower's third block stays model a's
    for name in got:
        taken = (name in vision and name.split(".encoder.layers.")[1].split(".")[0] in ("0", "1")
                 or name.startswith("language_model.model.layers.0."))
        assert torch.equal(got[name], (b if taken else a)[name]), name
