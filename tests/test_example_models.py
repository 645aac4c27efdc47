"""The bundled example checkpoints in examples/models are reproducible, loadable and heterogeneous."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODELS = EXAMPLES / "models"
NAMES = ["base", "code", "math", "prose", "chat"]  # chat: base's vocabulary + 2 tokens (tests/test_vocab_example.py)
ADAPTERS = ["lora-code", "lora-math"]  # PEFT LoRA adapters on base (tests/test_lora_example.py)
EXPERTS_BY_DELTA = ["code", "math", "prose"]  # increasing relative delta norm
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def _load_script():
    spec = importlib.util.spec_from_file_location("make_models", EXAMPLES / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(f)
    return tensors


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    return {name: _weights(MODELS / name) for name in NAMES}


def test_regeneration_is_byte_identical(tmp_path):
    _load_script().make_models(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in MODELS.iterdir()) == sorted(NAMES + ADAPTERS)
    for name in NAMES + ADAPTERS:
        committed = sorted(p.name for p in (MODELS / name).iterdir())
        regenerated = sorted(p.name for p in (tmp_path / name).iterdir())
        assert regenerated == committed, name
        for file in committed:
            assert (tmp_path / name / file).read_bytes() == (MODELS / name / file).read_bytes(), f"{name}/{file}"


def test_layout_and_shard_index(weights):
    base = MODELS / "base"
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:
        assert set(load_file(base / shard)) == {n for n, f in index["weight_map"].items() if f == shard}
    tensors = weights["base"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for w in weights.values() for t in w.values())
    assert all(set(w) == set(tensors) for w in weights.values())
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape != tensors["model.layers.0.self_attn.q_proj.weight"].shape
    for name in EXPERTS_BY_DELTA + ["chat"]:
        assert [p.name for p in (MODELS / name).glob("*.safetensors")] == ["model.safetensors"]
    for name, w in weights.items():
        rows = 514 if name == "chat" else 512
        assert all(w[t].shape == (rows, 64) for t in VOCAB_TENSORS), name
        assert all(t.shape == tensors[n].shape for n, t in w.items() if n not in VOCAB_TENSORS), name


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_transformers(name):
    transformers = pytest.importorskip("transformers")
    folder = MODELS / name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    enc = tokenizer("def add(a, b): return the sum of two numbers.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()


def test_experts_differ_from_base_in_every_layer(weights):
    base = weights["base"]
    num_layers = 1 + max(int(m.group(1)) for n in base if (m := LAYER_RE.match(n)))
    for layer in range(num_layers):
        names = [n for n in base if n.startswith(f"model.layers.{layer}.")]
        base_sq = sum(base[n].double().norm() ** 2 for n in names if base[n].dim() == 2)
        rel = []
        for expert in EXPERTS_BY_DELTA:
            deltas = {n: weights[expert][n].double() - base[n].double() for n in names}
            assert all(d.abs().max() > 0 for d in deltas.values()), (expert, layer)  # matrices and norms
            rel.append(float(sum(d.norm() ** 2 for n, d in deltas.items() if base[n].dim() == 2) / base_sq) ** 0.5)
        assert rel == sorted(rel) and len(set(rel)) == len(rel), (layer, rel)
        assert rel[0] > 0.01, (layer, rel)


def test_chat_is_a_fine_tune_of_base_with_two_added_special_tokens(weights):
    base, chat = weights["base"], weights["chat"]
    for name, w in base.items():
        assert (chat[name][: w.shape[0]].double() - w.double()).abs().max() > 0, name  # a delta everywhere
    for name in VOCAB_TENSORS:  # two new rows of their own, near the size of the others
        new, old = chat[name][512:].double(), chat[name][:512].double()
        assert not torch.equal(new[0], new[1])
        assert 0.5 < float(new.norm(dim=1).mean() / old.norm(dim=1).mean()) < 2, name
    files = {f: json.loads((MODELS / "chat" / f).read_text()) for f in ("tokenizer.json", "tokenizer_config.json")}
    added = {t["id"]: t for t in files["tokenizer.json"]["added_tokens"]}
    assert [added[i]["content"] for i in (512, 513)] == CHAT_TOKENS
    assert all(added[i]["special"] and not added[i]["normalized"] for i in (512, 513))
    assert sorted(files["tokenizer_config.json"]["added_tokens_decoder"], key=int) == [str(i) for i in sorted(added)]
    assert files["tokenizer_config.json"]["additional_special_tokens"] == CHAT_TOKENS
    assert json.loads((MODELS / "chat" / "config.json").read_text())["vocab_size"] == 514
    # the rest of the tokenizer is the base's: same BPE vocabulary and merges
    base_tokenizer = json.loads((MODELS / "base" / "tokenizer.json").read_text())
    assert files["tokenizer.json"]["model"] == base_tokenizer["model"]
