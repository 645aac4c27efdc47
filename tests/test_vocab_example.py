"""examples/vocab_union.merge: task arithmetic of code (512 tokens) and chat (514: <|im_start|> and <|im_end|>
added, embeddings resized; both made by examples/make_models.py) over base, with `tokenizer = union` and
`chat_template = chat`. It runs from any working directory; the output loads with transformers, has the union
vocabulary, the chat tokens' rows as chat stores them (base and code lack them and do not vote on them,
docs/vocabularies.md), the shared tokens' rows as task arithmetic of the inputs' rows (computed here with
torch), and chat's template. That make_models.py writes the chat model byte for byte again is
tests/test_example_models.py's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mgc.api import compile_recipe, run
from mgc.cli import main
from mgc.core.errors import MgcError

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODELS = EXAMPLES / "models"
RECIPE = EXAMPLES / "vocab_union.merge"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
SHARED = 512  # the base's tokens, ids 0..511 in every model


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def task_arithmetic(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
    """base + Σ (xᵢ − base), in float32 (weights 1, λ 1, no normalising: task_arithmetic's defaults), then bf16."""
    b = base.float()
    total = torch.zeros_like(b)
    for m in models:
        total += m.float() - b
    return (b + total).to(torch.bfloat16)


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vocab-example") / "vocab_union"
    plan, _ = run(RECIPE, output=out, device="cpu")
    assert [s.path for s in plan.program.saves] == [out]
    return out


def test_bundled_chat_model_adds_two_special_tokens():
    chat = MODELS / "chat"
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat)
    base = transformers.AutoTokenizer.from_pretrained(MODELS / "base")
    assert len(base) == 512 and len(tokenizer) == 514
    assert tokenizer.convert_tokens_to_ids(CHAT_TOKENS) == [512, 513]
    assert tokenizer("<|im_start|>")["input_ids"] == [tokenizer.bos_token_id, 512]
    assert set(CHAT_TOKENS) <= set(tokenizer.all_special_tokens)
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in base.get_vocab()} == base.get_vocab()  # base's ids kept
    config = json.loads((chat / "tokenizer_config.json").read_text())
    assert [config["added_tokens_decoder"][i]["content"] for i in ("512", "513")] == CHAT_TOKENS
    assert all(config["added_tokens_decoder"][i]["special"] for i in ("512", "513"))
    assert "<|im_start|>" in config["chat_template"]
    assert json.loads((chat / "config.json").read_text())["vocab_size"] == 514
    model = transformers.AutoModelForCausalLM.from_pretrained(chat)
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 514
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_recipe_output_has_the_union_vocabulary_and_loads(merged):
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert len(tokenizer) == 514 and model.config.vocab_size == 514
    assert tokenizer.convert_tokens_to_ids(CHAT_TOKENS) == [512, 513]
    assert tokenizer("<|im_start|>")["input_ids"] == [tokenizer.bos_token_id, 512]
    assert tokenizer("<|im_end|>")["input_ids"] == [tokenizer.bos_token_id, 513]
    base = transformers.AutoTokenizer.from_pretrained(MODELS / "base")
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in base.get_vocab()} == base.get_vocab()
    assert tokenizer.eos_token == "</s>"  # the base's special tokens: a union does not take chat's
    messages = [{"role": "user", "content": "def add(a, b):"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\ndef add(a, b):<|im_end|>\n<|im_start|>assistant\n"
    enc = tokenizer(text, return_tensors="pt")
    assert 512 in enc["input_ids"][0].tolist() and 513 in enc["input_ids"][0].tolist()
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 514) and torch.isfinite(logits).all()


def test_chat_template_is_carried_over(merged):
    template = json.loads((MODELS / "chat" / "tokenizer_config.json").read_text())["chat_template"]
    assert (merged / "chat_template.jinja").read_text() == template
    assert json.loads((merged / "tokenizer_config.json").read_text())["chat_template"] == template
    assert transformers.AutoTokenizer.from_pretrained(merged).chat_template == template


def test_rows_of_the_chat_tokens_are_chats_and_shared_rows_are_task_arithmetic(merged):
    got = weights(merged)
    base, code, chat = (weights(MODELS / m) for m in ("base", "code", "chat"))
    assert set(got) == set(base)
    for name in VOCAB_TENSORS:
        assert got[name].dtype == torch.bfloat16
        assert got[name].shape == (514, 64) and base[name].shape == code[name].shape == (512, 64)
        # shared tokens: the operator as written, on the three models' rows
        expected = task_arithmetic(base[name], code[name], chat[name][:SHARED])
        assert torch.equal(got[name][:SHARED], expected), name
        # base and code lack the chat tokens and do not vote: the base's row is the mean of the rows of the models
        # that have them (chat's), and task arithmetic of chat alone over it is chat's row as stored
        assert torch.equal(got[name][SHARED:], chat[name][SHARED:]), name
        assert not torch.equal(got[name][:SHARED], chat[name][:SHARED])  # code's task vector did move them
    for name in set(got) - set(VOCAB_TENSORS):  # every other tensor: the same operator, no alignment
        assert torch.equal(got[name], task_arithmetic(base[name], code[name], chat[name])), name


def test_recipe_runs_with_the_cli_from_another_directory(tmp_path, monkeypatch, merged):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--quiet", "--device", "cpu", "-o", "out", str(RECIPE)])
    assert result.exit_code == 0, result.output
    assert "writing the union of them: 514 tokens in 514 rows" in result.output
    for file in sorted(p.name for p in merged.iterdir()):
        assert (tmp_path / "out" / file).read_bytes() == (merged / file).read_bytes(), file


def test_check_reports_the_union(monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    result = CliRunner().invoke(main, ["check", "examples/vocab_union.merge"])
    assert result.exit_code == 0, result.output
    assert "warning: the models merged in this save have different vocabularies; writing the union of them: " \
        "514 tokens in 514 rows" in result.output
    for name in ("base", "code"):
        assert f"examples/models/{name}: 512 tokens in 512 rows; lacks 2 of the output's ('<|im_start|>', " \
            "'<|im_end|>'), and does not vote on their rows" in result.output
    assert "examples/models/chat: 514 tokens in 514 rows" in result.output
    program = compile_recipe(RECIPE).program
    assert {p.name for p in program.checkpoints} == {"base", "code", "chat"}
    assert [s.path for s in program.saves] == [(EXAMPLES.parent / "out" / "vocab_union").resolve()]


def test_without_tokenizer_union_the_check_refuses_with_the_hint(tmp_path):
    text = RECIPE.read_text().replace("tokenizer = union, ", "")
    assert text != RECIPE.read_text()
    with pytest.raises(MgcError) as info:  # named as a recipe in examples/, never written
        compile_recipe(EXAMPLES / "no_union.merge", text=text, output=tmp_path / "out")
    rendered = info.value.render()
    assert "error: the models merged in this save have different vocabularies" in rendered
    assert "hint: add `tokenizer = union` to the save" in rendered
