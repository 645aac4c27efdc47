"""The bundled LoRA adapters (examples/models/lora-code, lora-math, written by examples/make_models.py without
peft) are adapters peft itself loads, mgc's lora() of each equals peft's merge_and_unload(), and
examples/lora.merge runs from any working directory and writes checkpoints transformers loads. That
make_models.py writes the adapters byte for byte again is tests/test_example_models.py's."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from mgc.api import run
from mgc.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODELS = EXAMPLES / "models"
ADAPTERS = ["lora-code", "lora-math"]
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def base_model(dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(MODELS / "base", dtype=dtype)


@pytest.fixture(scope="module")
def peft_merged() -> dict[str, dict[str, torch.Tensor]]:
    """peft's merge_and_unload() of each bundled adapter on the base, in float32."""
    merged = {}
    for name in ADAPTERS:
        model = peft.PeftModel.from_pretrained(base_model(), MODELS / name)
        factors = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert factors and all(p.abs().max() > 0 for p in factors.values()), name  # loaded, B not peft's zeros
        merged[name] = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return merged


@pytest.mark.parametrize("name", ADAPTERS)
def test_bundled_adapter_is_in_peft_format(name):
    folder = MODELS / name
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["bias"]) == ("LORA", "CAUSAL_LM", "none")
    assert config["base_model_name_or_path"] == "models/base"  # relative to examples/, as model() would read it
    loaded = peft.LoraConfig.from_pretrained(folder)
    assert (loaded.r, loaded.lora_alpha, set(loaded.target_modules)) == (
        config["r"], config["lora_alpha"], set(config["target_modules"]))
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"F32"}
    base = weights(MODELS / "base")
    layers = {int(m.group(1)) for k in keys if (m := KEY.fullmatch(k))}
    assert layers == set(range(8))
    assert len(keys) == 2 * 8 * len(config["target_modules"])
    for key in keys:
        m = KEY.fullmatch(key)
        assert m and m.group(3) in config["target_modules"], key
        out, inp = base[key.removeprefix("base_model.model.").replace(f".lora_{m.group(4)}", "")].shape
        assert shapes[key] == ((config["r"], inp) if m.group(4) == "A" else (out, config["r"])), key


@pytest.mark.parametrize("name", ADAPTERS)
def test_bundled_adapter_merges_as_peft_does(name, peft_merged, tmp_path):
    out = tmp_path / name
    text = (f'base = model("models/base")\nm = lora("models/{name}", base = base)\n'
            f'save m to "{out}"\nsave m to "{out}-fp32" {{ dtype = fp32 }}\n')
    run(EXAMPLES / "t.merge", text=text, device="cpu")  # named as a recipe in examples/, never written
    reference, base = peft_merged[name], weights(MODELS / "base")
    got, got32 = weights(out), weights(tmp_path / f"{name}-fp32")
    assert set(got) == set(got32) == set(reference) == set(base)
    changed = 0
    for tensor, expected in reference.items():
        assert got[tensor].dtype == torch.bfloat16  # the base's dtype, as merge_and_unload() on it gives
        torch.testing.assert_close(got32[tensor], expected, rtol=1e-6, atol=1e-7, msg=tensor)
        torch.testing.assert_close(got[tensor], expected.to(torch.bfloat16), rtol=0, atol=0, msg=tensor)
        changed += not torch.equal(got[tensor], base[tensor])
    assert changed == 8 * len(json.loads((MODELS / name / "adapter_config.json").read_text())["target_modules"])


def test_base_from_adapter_config_is_the_bundled_base(peft_merged, tmp_path):
    """lora("models/lora-code") alone opens adapter_config.json's "models/base" relative to the recipe's folder."""
    run(EXAMPLES / "t.merge", text=f'save lora("models/lora-code") to "{tmp_path / "m"}" {{ dtype = fp32 }}\n',
        device="cpu")
    got = weights(tmp_path / "m")
    for tensor, expected in peft_merged["lora-code"].items():
        torch.testing.assert_close(got[tensor], expected, rtol=1e-6, atol=1e-7, msg=tensor)


def _check_outputs(folder: Path, peft_merged) -> None:
    base = weights(MODELS / "base")
    code = weights(folder / "lora-code")
    for tensor, expected in peft_merged["lora-code"].items():
        assert torch.equal(code[tensor], expected.to(torch.bfloat16)), tensor
    ties = weights(folder / "lora")
    assert set(ties) == set(base) and all(t.dtype == torch.bfloat16 for t in ties.values())
    moved = {t for t in ties if not torch.equal(ties[t], base[t])}
    # q_proj is adapted by both, v/down_proj by lora-code only, k/up_proj by lora-math only; nothing else moves
    assert {t.split(".")[-2] for t in moved} == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    for sub in ("lora-code", "lora"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder / sub)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder / sub)
        enc = tokenizer("def add(a, b): return a + b", return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all(), sub


def test_example_recipe_runs(peft_merged, tmp_path):
    plan, _ = run(EXAMPLES / "lora.merge", output=tmp_path, device="cpu")
    assert sorted(s.path.name for s in plan.program.saves) == ["lora", "lora-code"]
    _check_outputs(tmp_path, peft_merged)


def test_example_recipe_runs_with_the_cli_from_another_directory(peft_merged, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--quiet", "--device", "cpu", "-o", "out", str(EXAMPLES / "lora.merge")])
    assert result.exit_code == 0, result.output
    _check_outputs(tmp_path / "out", peft_merged)
