"""Tied and untied heads: a tied model (no lm_head stored) merged with untied ones takes part with its embedding
as its head; the output is tied only where its head is provably its embedding."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mgc.api import compile_recipe, run
from mgc.compiler.heads import head_candidates, layout, set_tie_flag, tie_flag
from mgc.core.errors import MgcError

from tiny_lms import WORDS, llama, tensors, token_ids, transformers

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("heads-zoo")
    llama(root / "tied", 0, cls="qwen2", tied=True)
    llama(root / "tied2", 1, cls="qwen2", tied=True)
    llama(root / "untied", 2, cls="qwen2")
    llama(root / "untied_chat", 3, cls="qwen2", added=["<|im_start|>", "<|im_end|>"])
    llama(root / "gpt_a", 4, cls="gpt2")
    llama(root / "gpt_b", 5, cls="gpt2")
    llama(root / "gemma_a", 6, cls="gemma2")
    llama(root / "gemma_chat", 7, cls="gemma2", added=["<|im_start|>"])
    return root


def merge(zoo: Path, tmp_path: Path, expr: str, options: str = "") -> Path:
    names = ("tied", "tied2", "untied", "untied_chat", "gpt_a", "gpt_b", "gemma_a", "gemma_chat")
    text = "".join(f'{n} = model("{zoo / n}")\n' for n in names) + f'save {expr} to "{tmp_path / "out"}" {options}\n'
    (tmp_path / "r.merge").write_text(text)
    run(tmp_path / "r.merge", device="cpu")
    return tmp_path / "out"


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def loaded(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder))


@pytest.mark.parametrize("order", ["tied, untied", "untied, tied"])
def test_a_tied_model_merged_with_an_untied_one_gives_an_untied_output(zoo, tmp_path, order):
    out = merge(zoo, tmp_path, f"linear({order})")
    got, t, u = tensors(out), tensors(zoo / "tied"), tensors(zoo / "untied")
    assert torch.allclose(got[EMB], (t[EMB] + u[EMB]) / 2, atol=1e-6)
    assert torch.allclose(got[HEAD], (t[EMB] + u[HEAD]) / 2, atol=1e-6)  # the tied model's head is its embedding
    assert config(out)["tie_word_embeddings"] is False
    model = loaded(out)
    assert torch.equal(model.lm_head.weight.detach(), got[HEAD])
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_an_output_whose_head_is_provably_its_embedding_stays_tied(zoo, tmp_path):
    out = merge(zoo, tmp_path, "slerp(tied, untied, t = 0)")  # t = 0 is the tied model, head and embedding alike
    got = tensors(out)
    assert HEAD not in got and torch.equal(got[EMB], tensors(zoo / "tied")[EMB])
    assert config(out)["tie_word_embeddings"] is True
    model = loaded(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_table_that_treats_the_head_apart_unties_the_output(zoo, tmp_path):
    out = merge(zoo, tmp_path, 'slerp(tied, untied, t = { lm_head: 0.5, _: 0 })')
    got = tensors(out)
    assert HEAD in got and config(out)["tie_word_embeddings"] is False


@pytest.mark.parametrize("expr, embedding", [("linear(tied, tied2)", EMB), ("linear(gpt_a, gpt_b)", "transformer.wte.weight"),
                                             ("linear(gemma_a, gemma_a)", EMB)])
def test_tied_models_merge_into_a_tied_output(zoo, tmp_path, expr, embedding):
    out = merge(zoo, tmp_path, expr)
    got = tensors(out)
    assert not [n for n in got if "lm_head" in n] and embedding in got
    assert config(out).get("tie_word_embeddings", True) is True
    model = loaded(out)
    assert torch.equal(model.get_output_embeddings().weight.detach(), got[embedding])


def test_tied_and_untied_with_different_vocabularies(zoo, tmp_path):
    out = merge(zoo, tmp_path, "linear(tied, untied_chat)", "{ tokenizer = union }")
    got, t, c = tensors(out), tensors(zoo / "tied"), tensors(zoo / "untied_chat")
    ids = token_ids(zoo / "untied_chat")
    shared = [ids[w] for w in WORDS]
    assert torch.allclose(got[HEAD][:32], (t[EMB] + c[HEAD][shared]) / 2, atol=1e-6)
    assert torch.allclose(got[EMB][:32], (t[EMB] + c[EMB][shared]) / 2, atol=1e-6)
    new = [ids["<|im_start|>"], ids["<|im_end|>"]]
    assert torch.allclose(got[HEAD][32:], c[HEAD][new], atol=1e-6)
    assert config(out)["tie_word_embeddings"] is False and config(out)["vocab_size"] == 34
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<|im_end|>") == 33 and loaded(out).lm_head.weight.shape[0] == 34


def test_gemma_tied_with_an_added_token_stays_tied(zoo, tmp_path):
    out = merge(zoo, tmp_path, "linear(gemma_a, gemma_chat)", "{ tokenizer = union }")
    got = tensors(out)
    assert HEAD not in got and got[EMB].shape[0] == 33
    new = tensors(zoo / "gemma_chat")[EMB][token_ids(zoo / "gemma_chat")["<|im_start|>"]]
    assert torch.allclose(got[EMB][32], new, atol=1e-6)
    assert loaded(out).get_output_embeddings().weight.shape[0] == 33


def test_a_model_without_a_head_that_says_it_is_untied_is_refused(zoo, tmp_path):
    broken = tmp_path / "broken"
    llama(broken, 8, cls="qwen2", tied=True)
    c = config(broken)
    c["tie_word_embeddings"] = False
    (broken / "config.json").write_text(json.dumps(c))
    (tmp_path / "r.merge").write_text(f'a = model("{zoo / "untied"}")\nb = model("{broken}")\nsave linear(a, b) to "{tmp_path / "o"}"\n')
    with pytest.raises(MgcError) as e:
        compile_recipe(tmp_path / "r.merge")
    assert "tensor 'lm_head.weight' is missing" in e.value.message and e.value.span.line == 3


@pytest.mark.parametrize("tensors_, embedding, head", [
    ({"model.embed_tokens.weight", "lm_head.weight"}, "model.embed_tokens.weight", "lm_head.weight"),
    ({"transformer.wte.weight", "transformer.wpe.weight"}, "transformer.wte.weight", None),
    ({"gpt_neox.embed_in.weight", "embed_out.weight"}, "gpt_neox.embed_in.weight", "embed_out.weight"),
    ({"language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
      "vision_tower.vision_model.embeddings.patch_embedding.weight"}, "language_model.model.embed_tokens.weight",
     "language_model.lm_head.weight"),
    ({"model.language_model.embed_tokens.weight", "lm_head.weight"}, "model.language_model.embed_tokens.weight", "lm_head.weight"),
])
def test_embeddings_and_heads_are_found_by_name(tensors_, embedding, head):
    lay = layout(tensors_)
    assert (lay.embedding, lay.head) == (embedding, head)
    assert head is None or head in head_candidates(embedding)


def test_unknown_layouts_are_not_guessed():
    assert layout({"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}) is None
    assert layout({"model.layers.0.mlp.weight"}) is None


def test_the_tie_flag_is_read_and_written_where_the_config_states_it():
    nested = {"model_type": "llava", "text_config": {"tie_word_embeddings": False}}
    assert tie_flag(nested) is False and tie_flag({}) is None
    set_tie_flag(nested, True)
    assert nested["tie_word_embeddings"] is True and nested["text_config"]["tie_word_embeddings"] is True


def test_a_tied_model_can_give_the_head_of_an_untied_one(zoo, tmp_path):
    out = merge(zoo, tmp_path, 'untied with { lm_head: tied }')
    got = tensors(out)
    assert torch.equal(got[HEAD], tensors(zoo / "tied")[EMB]) and config(out)["tie_word_embeddings"] is False
    out2 = tmp_path / "again"
    out2.mkdir()
    everything = merge(zoo, out2, 'untied with { _: tied }')
    assert HEAD not in tensors(everything) and config(everything)["tie_word_embeddings"] is True
