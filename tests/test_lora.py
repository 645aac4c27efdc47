"""lora("adapter"): PEFT LoRA adapters as model values. Tiny bases are made with transformers' classes and the
adapters with peft (lora_B randomised: peft starts it at zero); every merge is compared with peft's own
merge_and_unload() of the same adapter on the same base."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mgc.api import compile_recipe, run
from mgc.cli import main
from mgc.core.errors import MgcError
from mgc.stdlib import INTERNAL_OPERATORS, OPERATORS

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, tie_word_embeddings=False)
# name -> (base, seed, LoraConfig arguments)
ADAPTERS = {
    "plain": ("llama", 1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "math": ("llama", 2, dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"])),
    "code": ("llama", 3, dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "gate_proj"])),
    "patterns": ("llama", 4, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"], modules_to_save=["norm"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 3}, alpha_pattern={"^model.layers.0.self_attn.q_proj": 5},
    )),
    "rslora": ("llama", 5, dict(r=4, lora_alpha=8, target_modules=r".*\.(q|k)_proj", use_rslora=True)),
    "layers": ("llama", 6, dict(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"], layers_to_transform=[1])),
    "conv1d": ("gpt2", 7, dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "qwen_bias": ("qwen2", 8, dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], bias="all")),
}


def _base_model(kind: str):
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))


def _load(kind: str, root: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(root / f"base-{kind}"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Bases (llama, qwen2, gpt2) and peft adapters on them, with peft's merge_and_unload() of each."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    for kind in ("llama", "qwen2", "gpt2"):
        _base_model(kind).save_pretrained(root / f"base-{kind}")
    merged = {}
    for name, (kind, seed, args) in ADAPTERS.items():
        torch.manual_seed(seed)
        model = peft.get_peft_model(_load(kind, root), peft.LoraConfig(**args))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n or "lora_embedding_B" in n:
                    torch.nn.init.normal_(p, std=0.5)
                elif p.requires_grad:  # modules_to_save copies and trained biases: make them differ from the base
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / name)
        merged[name] = model.merge_and_unload().state_dict()
    return root, merged


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merge(root: Path, out: Path, body: str, **kw) -> dict[str, torch.Tensor]:
    recipe = root / f"{out.name}.merge"
    recipe.write_text(body + f'\nsave m to "{out}"\n')
    run(recipe, **kw)
    return weights(out)


def same_as(got: dict, reference: dict, base: dict) -> None:
    """Every tensor written equals peft's, and the adapted ones moved away from the base."""
    changed = 0
    for name, t in got.items():
        torch.testing.assert_close(t, reference[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(t, base[name])
    assert changed


def error_of(root: Path, body: str, **kw) -> MgcError:
    recipe = root / "bad.merge"
    recipe.write_text(body + f'\nsave m to "{root / "never"}"\n')
    with pytest.raises(MgcError) as info:
        compile_recipe(recipe, **kw)
    err = info.value
    assert err.span is not None and "^" in err.render(), err.render()
    assert not (root / "never").exists()
    return err


@pytest.mark.parametrize("name", ["plain", "patterns", "rslora", "layers", "conv1d", "qwen_bias"])
def test_save_lora_equals_peft_merge_and_unload(zoo, tmp_path, name):
    root, merged = zoo
    kind = ADAPTERS[name][0]
    got = merge(root, tmp_path / name, f'm = lora("{root / name}")')
    base = weights(root / f"base-{kind}")
    assert set(got) == set(base)
    same_as(got, merged[name], base)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name))
    with torch.no_grad():
        logits = loaded(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_a_bf16_base_stays_bf16_and_rounds_as_peft(zoo, tmp_path):
    root, _ = zoo
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "base-llama"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    reference = peft.PeftModel.from_pretrained(model, str(root / "plain")).merge_and_unload().state_dict()
    got = merge(root, tmp_path / "out", f'm = lora("{root / "plain"}", base = model("{tmp_path / "bf16"}"))')
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, t in got.items():
        torch.testing.assert_close(t.float(), reference[name].float(), rtol=8e-3, atol=1e-5, msg=name)


def test_the_pieces_peft_saves_are_merged_as_peft_loads_them(zoo):
    """patterns: rank and alpha per module, embedding LoRA, a LoRA head, modules_to_save (every *norm)."""
    root, _ = zoo
    keys = load_file(root / "patterns" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert keys["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 3
    assert "base_model.model.model.norm.weight" in keys  # modules_to_save, under its own name
    plan = compile_recipe(root / "p.merge", text=f'save lora("{root / "patterns"}") to "{root / "p-out"}"')
    assert "lora 6" in plan.summary()  # q and v in 2 layers, the embeddings and the head


def test_scale_multiplies_the_update(zoo, tmp_path):
    root, merged = zoo
    base = weights(root / "base-llama")
    got = merge(root, tmp_path / "half", f'm = lora("{root / "plain"}", scale = 0.5)')
    half = {n: base[n] + 0.5 * (merged["plain"][n] - base[n]) for n in base}
    same_as(got, half, base)
    ramp = merge(root, tmp_path / "ramp", f'm = lora("{root / "plain"}", scale = [0, 1])')
    name = "model.layers.{}.self_attn.q_proj.weight"
    torch.testing.assert_close(ramp[name.format(0)], base[name.format(0)], rtol=0, atol=0)
    torch.testing.assert_close(ramp[name.format(1)], merged["plain"][name.format(1)], rtol=1e-5, atol=1e-6)


def test_ties_of_two_adapters_equals_ties_of_their_merges(zoo, tmp_path):
    root, merged = zoo
    for name in ("math", "code"):
        model = _load("llama", root)
        model.load_state_dict(merged[name])
        model.save_pretrained(tmp_path / f"{name}-full")
    base = f'base = model("{root / "base-llama"}")\n'
    got = merge(root, tmp_path / "ties", base + f'm = ties(lora("{root / "math"}"), lora("{root / "code"}"), base = base)')
    want = merge(root, tmp_path / "ties-ref", base + f'm = ties(model("{tmp_path / "math-full"}"), '
                                                     f'model("{tmp_path / "code-full"}"), base = base)')
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_an_explicit_base_and_layer_placement(zoo, tmp_path):
    root, merged = zoo
    base = weights(root / "base-llama")
    body = (f'b = model("{root / "base-llama"}")\nm = slerp(b, lora("{root / "plain"}", base = b), t = [0, 1])')
    got = merge(root, tmp_path / "slerp", body)
    name = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(got[name.format(0)], base[name.format(0)])
    torch.testing.assert_close(got[name.format(1)], merged["plain"][name.format(1)], rtol=1e-5, atol=1e-6)


def test_a_relative_base_resolves_like_model(zoo, tmp_path, monkeypatch):
    root, merged = zoo
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "plain", adapter)
    shutil.copytree(root / "base-llama", tmp_path / "llama")
    _edit_config(adapter, base_model_name_or_path="llama")
    monkeypatch.chdir(tmp_path)
    got = merge(tmp_path, tmp_path / "out", 'm = lora("adapter")')
    same_as(got, merged["plain"], weights(root / "base-llama"))


def test_the_same_adapter_twice_is_computed_once(zoo):
    root, _ = zoo
    a = f'lora("{root / "plain"}")'
    plan = compile_recipe(root / "cse.merge", text=f'save linear({a}, {a}) to "{root / "cse-out"}"')
    assert "lora 6)" in plan.summary() or "lora 6," in plan.summary()


def test_other_key_forms_peft_reads(zoo, tmp_path):
    """modules_to_save stored as ...modules_to_save.default..., keys without base_model.model., a .bin file."""
    root, merged = zoo
    adapter = tmp_path / "old"
    shutil.copytree(root / "patterns", adapter)
    file = adapter / "adapter_model.safetensors"
    state = load_file(file)
    state = {k.replace("base_model.model.", ""): v for k, v in state.items()}
    state["model.norm.modules_to_save.default.weight"] = state.pop("model.norm.weight")
    save_file(state, file)
    base = weights(root / "base-llama")
    same_as(merge(root, tmp_path / "old-out", f'm = lora("{adapter}")'), merged["patterns"], base)
    torch.save(state, adapter / "adapter_model.bin")
    file.unlink()
    err = error_of(root, f'm = lora("{adapter}")')
    assert "pickle" in err.message and "--allow-pickle" in err.hint
    same_as(merge(root, tmp_path / "bin-out", f'm = lora("{adapter}")', allow_pickle=True), merged["patterns"], base)


def _edit_config(folder: Path, **changes) -> None:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, words", [
    (dict(use_dora=True), "DoRA (use_dora)"),
    (dict(peft_type="LOHA"), "a LOHA adapter, not LoRA"),
    (dict(peft_type="IA3"), "a IA3 adapter, not LoRA"),
    (dict(init_lora_weights="pissa"), "initialised with pissa"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer replication"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(target_parameters=["mlp.experts.down_proj"]), "target_parameters"),
    (dict(r=3), "r = 3"),
    (dict(base_model_name_or_path="nowhere"), "base_model_name_or_path"),
    (dict(base_model_name_or_path=None), "names no base model"),
])
def test_what_cannot_be_merged_exactly_is_refused_by_name(zoo, tmp_path, changes, words):
    root, _ = zoo
    adapter = tmp_path / "a"
    shutil.copytree(root / "plain", adapter)
    _edit_config(adapter, **changes)
    err = error_of(tmp_path, f'm = lora("{adapter}")')
    assert words in err.message, err.render()
    assert err.span.line == 1 and err.span.col == 10
    if "base_model" in words:
        assert "base = model(" in err.hint


def test_a_quantized_base_is_refused(zoo, tmp_path):
    root, _ = zoo
    shutil.copytree(root / "base-llama", tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    err = error_of(tmp_path, f'm = lora("{root / "plain"}", base = model("{tmp_path / "q"}"))')
    assert "quantized" in err.message


def test_bad_adapter_files_are_located_errors(zoo, tmp_path):
    root, _ = zoo
    adapter = tmp_path / "a"
    shutil.copytree(root / "plain", adapter)
    file = adapter / "adapter_model.safetensors"
    state = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    state[key.replace("q_proj", "x_proj")] = state.pop(key)
    state[key.replace("q_proj", "x_proj").replace("lora_B", "lora_A")] = state.pop(key.replace("lora_B", "lora_A"))
    save_file(state, file)
    err = error_of(tmp_path, f'm = lora("{adapter}")')
    assert str(file) in err.message and "x_proj.lora_A.weight" in err.message and "does not have" in err.message
    state = load_file(root / "plain" / "adapter_model.safetensors")
    state[key] = torch.zeros(8, 4)
    save_file(state, file)
    err = error_of(tmp_path, f'm = lora("{adapter}")')
    assert str(file) in err.message and "q_proj" in err.message and "[16, 16]" in err.message
    file.write_bytes(file.read_bytes()[:-10])
    assert "adapter_model.safetensors" in error_of(tmp_path, f'm = lora("{adapter}")').message
    file.unlink()
    assert "no adapter_model.safetensors" in error_of(tmp_path, f'm = lora("{adapter}")').message
    (adapter / "adapter_config.json").unlink()
    assert "no adapter_config.json" in error_of(tmp_path, f'm = lora("{adapter}")').message
    assert "no LoRA adapter folder" in error_of(tmp_path, f'm = lora("{tmp_path / "nothing"}")').message
    err = error_of(tmp_path, f'm = lora("{root / "plain"}", base = model("{root / "base-gpt2"}"))')
    assert "does not have" in err.message


def test_model_of_an_adapter_points_at_lora(zoo, tmp_path):
    root, _ = zoo
    err = error_of(tmp_path, f'm = model("{root / "plain"}")')
    assert "is a LoRA adapter" in err.message and f'use lora("{root / "plain"}")' in err.hint


def test_bad_calls_of_lora(zoo, tmp_path):
    root, _ = zoo
    a = f'"{root / "plain"}"'
    assert "unknown parameter 'scael'" in error_of(tmp_path, f"m = lora({a}, scael = 2)").message
    assert "one adapter folder" in error_of(tmp_path, "m = lora()").message
    assert "path string" in error_of(tmp_path, f'm = lora(model("{root / "base-llama"}"))').message
    assert "scale must be a number" in error_of(tmp_path, f"m = lora({a}, scale = true)").message
    assert "not fetched" in error_of(tmp_path, 'm = lora("hf://org/adapter")').message


def test_the_update_is_internal(zoo, tmp_path):
    """The runtime runs it; a recipe cannot call it, and `mgc ops` does not list it."""
    assert "lora" in INTERNAL_OPERATORS and "lora" not in OPERATORS
    root, _ = zoo
    recipe = tmp_path / "r.merge"
    recipe.write_text(f'save lora("{root / "plain"}", scale = 2) to "{tmp_path / "o"}"\n')
    result = CliRunner().invoke(main, ["check", str(recipe)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["ops"])
    assert "lora" not in result.output
    recipe.write_text(f'save lora("{tmp_path}") to "{tmp_path / "o"}"\n')
    result = CliRunner().invoke(main, ["check", str(recipe)])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_the_update_streams_in_row_blocks(monkeypatch):
    """A tensor larger than one block gives what one whole addmm gives, as stored dtypes in and out."""
    from mgc.stdlib import lora_update, slices
    from conftest import call_merge

    monkeypatch.setattr(slices, "SLICE", 64)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g).to(torch.bfloat16)
    a, b = torch.randn(3, 24, generator=g), torch.randn(40, 3, generator=g)
    p = lora_update.Params(scale=0.7, transpose=False)
    out = call_merge(lora_update.INTERNAL_OPERATOR, [a, b], p, base=w, out=torch.empty(40, 24, dtype=torch.bfloat16))
    torch.testing.assert_close(out.float(), w.float() + 0.7 * b @ a, rtol=1e-2, atol=1e-2)
    pt = lora_update.Params(scale=0.7, transpose=True)
    wt = torch.randn(24, 40, generator=g)
    torch.testing.assert_close(call_merge(lora_update.INTERNAL_OPERATOR, [a, b], pt, base=wt), wt + 0.7 * (b @ a).T)


def test_tables_stacks_and_an_adapter_on_an_adapter(zoo, tmp_path):
    root, merged = zoo
    base = weights(root / "base-llama")
    plain = f'lora("{root / "plain"}")'
    got = merge(root, tmp_path / "t", f'm = lora("{root / "plain"}", scale = {{ "layers.1.": 0, _: 1 }})')
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.weight"],
                               merged["plain"]["model.layers.0.self_attn.q_proj.weight"], rtol=1e-5, atol=1e-6)
    got = merge(root, tmp_path / "s", f'b = model("{root / "base-llama"}")\nm = stack({plain}.layers[1:2], b.layers[1:2])')
    assert torch.equal(got["model.layers.0.mlp.down_proj.weight"], merged["plain"]["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"])
    got = merge(root, tmp_path / "ll", f'm = lora("{root / "rslora"}", base = {plain})')
    both = {n: merged["plain"][n] + merged["rslora"][n] - base[n] for n in base}
    same_as(got, both, base)


def test_incomplete_and_unknown_adapter_tensors(zoo, tmp_path):
    root, _ = zoo
    adapter = tmp_path / "a"
    shutil.copytree(root / "plain", adapter)
    file = adapter / "adapter_model.safetensors"
    state = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del state[key]
    save_file(state, file)
    assert "has no lora_B.weight" in error_of(tmp_path, f'm = lora("{adapter}")').message
    state[key] = torch.zeros(16, 4)
    state[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(16)
    save_file(state, file)
    err = error_of(tmp_path, f'm = lora("{adapter}")')
    assert "lora_magnitude_vector" in err.message and "not a LoRA tensor mgc knows" in err.message


def test_an_output_inside_an_adapter_folder_is_refused(zoo, tmp_path):
    root, _ = zoo
    adapter = tmp_path / "a"
    shutil.copytree(root / "plain", adapter)
    recipe = tmp_path / "r.merge"
    recipe.write_text(f'save lora("{adapter}") to "{adapter / "merged"}"\n')
    with pytest.raises(MgcError, match="lies inside the input LoRA adapter"):
        compile_recipe(recipe)
