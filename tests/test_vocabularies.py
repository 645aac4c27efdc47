"""Merging models whose vocabularies differ: `tokenizer = union | base | NAME`, `tokens`, `pad_to_multiple_of` and
`chat_template`. Every expected row is computed here by hand with torch from the inputs' rows, found by token."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mgc.api import compile_recipe, run
from mgc.cli import main
from mgc.core.errors import MgcError

from tiny_lms import TEMPLATE, WORDS, llama, tensors, token_ids, transformers

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
ADDED = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab-zoo")
    llama(root / "base", 0)
    llama(root / "code", 1)
    llama(root / "chat", 2, added=ADDED, template=TEMPLATE)
    llama(root / "chat2", 3, added=["<|im_end|>", "<tool>"])  # its <|im_end|> has id 32, chat's 33
    llama(root / "short", 4, added=["<x>"])
    return root


def recipe(zoo: Path, tmp_path: Path, body: str) -> Path:
    names = {"b0": "base", "code": "code", "chat": "chat", "chat2": "chat2"}  # b0: `base` stays the keyword
    text = "".join(f'{n} = model("{zoo / folder}")\n' for n, folder in names.items()) + body
    path = tmp_path / "r.merge"
    path.write_text(text)
    return path


def rows(folder: Path, name: str, tokens) -> torch.Tensor:
    """The rows of tensor `name` of a checkpoint for the given tokens, found through its own tokenizer."""
    ids = token_ids(folder)
    return tensors(folder)[name][[ids[t] for t in tokens]].float()


def test_union_merges_shared_rows_and_added_rows_from_the_models_that_have_them(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(b0, chat, chat2, weights = [1, 3, 2]) to "{tmp_path / "out"}" {{ tokenizer = union }}\n')
    plan, _ = run(r, device="cpu")
    out = tmp_path / "out"
    got, ids = tensors(out), token_ids(out)
    assert len(ids) == 35 and [ids[t] for t in WORDS] == list(range(32))  # the base's order first
    assert [ids["<|im_start|>"], ids["<|im_end|>"], ids["<tool>"]] == [32, 33, 34]  # then chat's, then chat2's
    for name in (EMB, HEAD):
        b, c, c2 = (rows(zoo / m, name, WORDS) for m in ("base", "chat", "chat2"))
        assert torch.allclose(got[name][:32], (1 * b + 3 * c + 2 * c2) / 6, atol=1e-6)
        # only chat has <|im_start|>: linear of chat alone (weight 3, normalised: (3·x)/3) is its row
        assert torch.allclose(got[name][32], rows(zoo / "chat", name, ["<|im_start|>"])[0], atol=1e-6)
        # chat and chat2 have <|im_end|> (at different ids): the operator on those two, weights [3, 2]
        both = (3 * rows(zoo / "chat", name, ["<|im_end|>"]) + 2 * rows(zoo / "chat2", name, ["<|im_end|>"])) / 5
        assert torch.allclose(got[name][33], both[0], atol=1e-6)
        assert torch.allclose(got[name][34], rows(zoo / "chat2", name, ["<tool>"])[0], atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 35
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    enc = tok.encode("w3 <|im_start|> <|im_end|> <tool>", add_special_tokens=False)
    assert enc == [ids["w3"], 32, 33, 34] and max(enc) < model.config.vocab_size
    assert torch.equal(model.get_input_embeddings().weight[33].detach(), got[EMB][33])


def test_task_vectors_where_the_base_lacks_a_token_use_the_mean_of_the_models_that_have_it(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save task_arithmetic(chat, chat2, base = b0, weights = [1, 0.5]) to "{tmp_path / "out"}" '
                              "{ tokenizer = union }\n")
    run(r, device="cpu")
    got = tensors(tmp_path / "out")[EMB]
    c, c2 = rows(zoo / "chat", EMB, ["<|im_end|>"])[0], rows(zoo / "chat2", EMB, ["<|im_end|>"])[0]
    base_row = (c + c2) / 2
    assert torch.allclose(got[33], base_row + 1 * (c - base_row) + 0.5 * (c2 - base_row), atol=1e-6)
    b, x, y = (rows(zoo / m, EMB, ["w5"])[0] for m in ("base", "chat", "chat2"))
    assert torch.allclose(got[token_ids(tmp_path / "out")["w5"]], b + (x - b) + 0.5 * (y - b), atol=1e-6)
    # only chat has <|im_start|>: task arithmetic of chat alone over the mean base, which is chat itself
    assert torch.allclose(got[32], rows(zoo / "chat", EMB, ["<|im_start|>"])[0], atol=1e-6)


def test_tokenizer_base_keeps_the_base_vocabulary(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save slerp(b0, chat, t = 0.5) to "{tmp_path / "out"}" {{ tokenizer = base }}\n')
    run(r, device="cpu")
    out = tmp_path / "out"
    got = tensors(out)
    assert got[EMB].shape[0] == got[HEAD].shape[0] == 32 and len(token_ids(out)) == 32
    from mgc.stdlib.slerp import OPERATOR as slerp
    from conftest import call_merge
    expected = call_merge(slerp, [rows(zoo / "base", EMB, WORDS), rows(zoo / "chat", EMB, WORDS)], slerp.params(t=0.5))
    assert torch.allclose(got[EMB].float(), expected, atol=1e-6)
    assert (out / "tokenizer.json").read_bytes() == (zoo / "base" / "tokenizer.json").read_bytes()


def test_tokenizer_name_takes_that_models_vocabulary_and_ids(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(b0, chat2) to "{tmp_path / "out"}" {{ tokenizer = chat2 }}\n')
    run(r, device="cpu")
    out = tmp_path / "out"
    assert token_ids(out) == token_ids(zoo / "chat2")
    got = tensors(out)[EMB]
    assert torch.allclose(got[32], rows(zoo / "chat2", EMB, ["<|im_end|>"])[0], atol=1e-6)  # only chat2 has it


def test_tokens_option_takes_chosen_rows_from_a_chosen_model(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(b0, chat, chat2) to "{tmp_path / "out"}" '
                              '{ tokenizer = union, tokens = { "<|im_end|>": chat2, w7: code } }\n')
    run(r, device="cpu")
    out = tmp_path / "out"
    got, ids = tensors(out), token_ids(out)
    for name in (EMB, HEAD):
        assert torch.equal(got[name][ids["<|im_end|>"]], rows(zoo / "chat2", name, ["<|im_end|>"])[0])
        assert torch.equal(got[name][ids["w7"]], rows(zoo / "code", name, ["w7"])[0])


def test_pad_to_multiple_of_pads_with_the_mean_row_and_updates_the_config(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(b0, chat) to "{tmp_path / "out"}" {{ tokenizer = union, pad_to_multiple_of = 8 }}\n')
    run(r, device="cpu")
    out = tmp_path / "out"
    got = tensors(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 40
    for name in (EMB, HEAD):
        assert got[name].shape[0] == 40
        assert torch.allclose(got[name][34:], got[name][:34].mean(dim=0).expand(6, -1), atol=1e-6)
    assert len(token_ids(out)) == 34
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == 40


def test_padding_alone_needs_no_other_vocabulary(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(b0, code) to "{tmp_path / "out"}" {{ pad_to_multiple_of = 48 }}\n')
    run(r, device="cpu")
    got = tensors(tmp_path / "out")[EMB]
    expected = (rows(zoo / "base", EMB, WORDS) + rows(zoo / "code", EMB, WORDS)) / 2
    assert got.shape[0] == 48 and torch.allclose(got[:32], expected, atol=1e-6)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (zoo / "base" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("value, expected", [("chat", TEMPLATE), ('"{{ messages[0].content }}"', "{{ messages[0].content }}")])
def test_chat_template_from_a_model_or_as_text(zoo, tmp_path, value, expected):
    r = recipe(zoo, tmp_path, f'save linear(b0, code) to "{tmp_path / "out"}" {{ chat_template = {value} }}\n')
    run(r, device="cpu")
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template == expected


def test_agreeing_vocabularies_change_nothing(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(b0, code) to "{tmp_path / "out"}" {{ tokenizer = union }}\n')
    plan = compile_recipe(r)
    assert plan.graph.counts() == {"load": 42, "apply": 21, "save": 21} and not plan.program.warnings


def test_differing_vocabularies_without_a_tokenizer_option_are_refused_with_a_hint(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(b0, chat) to "{tmp_path / "out"}"\n')
    result = CliRunner().invoke(main, ["check", str(r)])
    assert result.exit_code == 1
    assert "different vocabularies" in result.output
    assert "base: 32 tokens in 32 rows, " in result.output and "chat: 34 tokens in 34 rows" in result.output
    assert "hint: add `tokenizer = union`" in result.output and "r.merge:5:1" in result.output


def test_check_warns_with_counts_and_token_strings(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(b0, chat) to "{tmp_path / "out"}" {{ tokenizer = union }}\n')
    result = CliRunner().invoke(main, ["check", str(r)])
    assert result.exit_code == 0, result.output
    assert "warning: the models merged in this save have different vocabularies; writing the union of them: 34 tokens in 34 rows" in result.output
    assert "lacks 2 of the output's ('<|im_start|>', '<|im_end|>'), and does not vote on their rows" in result.output
    assert "r.merge:5:" in result.output and "hint: docs/vocabularies.md" in result.output


def test_a_parameter_invalid_for_a_subset_of_models_is_located(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(chat, chat2, b0, weights = [1, -1, 3]) to "{tmp_path / "out"}" {{ tokenizer = union }}\n')
    with pytest.raises(MgcError) as e:
        compile_recipe(r)
    assert "on the 1 token rows only models 1, 2 have" in e.value.message and e.value.span.line == 5
    assert "tokens = {...}" in e.value.hint


@pytest.mark.parametrize("options, message", [
    ('{ tokens = { "<nope>": chat }, tokenizer = union }', "token '<nope>' is not in the output's vocabulary"),
    ("{ tokens = chat }", "tokens must be a table"),
    ("{ pad_to_multiple_of = 0 }", "pad_to_multiple_of must be a whole number"),
    ("{ chat_template = b0 }", "has no chat template"),
    ("{ chat_template = 3 }", "chat_template must be a model or a string"),
])
def test_bad_vocabulary_options_are_located(zoo, tmp_path, options, message):
    r = recipe(zoo, tmp_path, f'save linear(b0, chat) to "{tmp_path / "out"}" {options}\n')
    with pytest.raises(MgcError) as e:
        compile_recipe(r)
    assert message in str(e.value) and e.value.span is not None


def test_a_tokenizer_with_more_ids_than_rows_is_refused(zoo, tmp_path):
    broken = tmp_path / "broken"
    llama(broken, 5)
    tok = transformers.AutoTokenizer.from_pretrained(str(broken))
    tok.add_tokens(["<new>"])
    tok.save_pretrained(broken)  # resize_token_embeddings forgotten
    path = tmp_path / "r.merge"
    path.write_text(f'a = model("{zoo / "base"}")\nb = model("{broken}")\nsave linear(a, b) to "{tmp_path / "o"}" {{ tokenizer = union }}\n')
    with pytest.raises(MgcError, match="at id 32, but its embedding has only 32 rows"):
        compile_recipe(path)


def test_without_tokenizer_packages_agreeing_vocabularies_still_merge(zoo, tmp_path, monkeypatch):
    from mgc.compiler import vocab_read

    monkeypatch.setattr(vocab_read, "_CACHE", {})
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    ok = recipe(zoo, tmp_path, f'save linear(b0, code) to "{tmp_path / "out"}" {{ tokenizer = code }}\n')
    assert compile_recipe(ok).program.saves[0].vocab.names == ()
    differ = recipe(zoo, tmp_path, f'save linear(b0, chat) to "{tmp_path / "out"}" {{ tokenizer = union }}\n')
    with pytest.raises(MgcError) as e:
        compile_recipe(differ)
    assert "needs the tokenizers package" in e.value.message and "mgc[eval]" in e.value.hint


@pytest.fixture(scope="module")
def reordered(tmp_path_factory) -> Path:
    """The base's tokens at other ids (reversed), and one with a token of its own in place of w27 (same size)."""
    root = tmp_path_factory.mktemp("vocab-reordered")
    llama(root / "perm", 9, words=WORDS[::-1])
    llama(root / "renamed", 10, words=WORDS[:-1] + ["<reserved>"])
    return root


def test_rows_are_matched_by_token_string_not_by_id(zoo, reordered, tmp_path):
    path = tmp_path / "r.merge"
    path.write_text(f'b0 = model("{zoo / "base"}")\np = model("{reordered / "perm"}")\n'
                    f'save linear(b0, p) to "{tmp_path / "out"}" {{ tokenizer = union }}\n')
    plan, _ = run(path, device="cpu")
    assert not plan.program.warnings or "lacks" not in plan.program.warnings[0].message
    got = tensors(tmp_path / "out")
    for name in (EMB, HEAD):
        assert torch.allclose(got[name], (rows(zoo / "base", name, WORDS) + rows(reordered / "perm", name, WORDS)) / 2, atol=1e-6)


def test_a_tokenizer_of_another_model_moves_the_configs_special_ids(zoo, reordered, tmp_path):
    path = tmp_path / "r.merge"
    path.write_text(f'b0 = model("{zoo / "base"}")\np = model("{reordered / "perm"}")\n'
                    f'save linear(b0, p) to "{tmp_path / "out"}" {{ tokenizer = p }}\n')
    run(path, device="cpu")
    out = tmp_path / "out"
    ids = token_ids(out)
    assert ids["<s>"] == 30 and json.loads((out / "config.json").read_text())["bos_token_id"] == 30
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == ids["</s>"] == 29
    got = tensors(out)[EMB]
    assert torch.allclose(got[30], (rows(zoo / "base", EMB, ["<s>"]) + rows(reordered / "perm", EMB, ["<s>"]))[0] / 2, atol=1e-6)


def test_same_size_vocabularies_with_different_tokens_are_not_merged_blindly(zoo, reordered, tmp_path):
    path = tmp_path / "r.merge"
    body = f'b0 = model("{zoo / "base"}")\nr = model("{reordered / "renamed"}")\nsave linear(b0, r) to "{tmp_path / "out"}"'
    path.write_text(body + "\n")
    with pytest.raises(MgcError, match="different vocabularies"):
        compile_recipe(path)
    path.write_text(body + " { tokenizer = union }\n")
    run(path, device="cpu")
    ids = token_ids(tmp_path / "out")
    assert len(ids) == 33 and ids["<reserved>"] == 32
    got = tensors(tmp_path / "out")[EMB]
    assert torch.allclose(got[32], rows(reordered / "renamed", EMB, ["<reserved>"])[0], atol=1e-6)
    assert torch.allclose(got[31], rows(zoo / "base", EMB, ["w27"])[0], atol=1e-6)  # only the base has w27


def test_plan_counts_the_row_gathers(zoo, tmp_path):
    r = recipe(zoo, tmp_path, f'save linear(b0, chat) to "{tmp_path / "out"}" {{ tokenizer = union }}\n')
    summary = compile_recipe(r).summary()
    assert "row gathers" in summary and "(vocabularies aligned)" in summary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_aligned_merge_on_cuda_equals_cpu(zoo, tmp_path):
    body = 'save ties(chat, chat2, base = b0, density = 0.5) to "{out}" { tokenizer = union, pad_to_multiple_of = 8 }\n'
    for device in ("cpu", "cuda"):
        run(recipe(zoo, tmp_path, body.replace("{out}", str(tmp_path / device))), device=device)
    cpu, cuda = tensors(tmp_path / "cpu"), tensors(tmp_path / "cuda")
    for name in (EMB, HEAD):
        assert torch.allclose(cpu[name], cuda[name], atol=1e-5), name


def test_a_rows_node_copies_rows_takes_means_and_fills_the_rest_with_the_mean_of_the_copied():
    import dataclasses

    import numpy as np

    from mgc.compiler.ir import Rows
    from mgc.runtime.rows import run_rows

    def ints(*v):
        return np.array(v, dtype="<i4").tobytes()

    a, b = torch.arange(6.0).reshape(3, 2), 10 + torch.arange(6.0).reshape(3, 2)
    node = Rows((5, 2), ints(1, 0, -1, -1, -1), ints(2, 0, 0, 0, 0), ((ints(2), ((0, ints(1)), (1, ints(1)))),), "t")
    out = run_rows(node, [a, b], torch.device("cpu"))
    assert torch.equal(out[0], b[2]) and torch.equal(out[1], a[0])
    assert torch.equal(out[2], (a[1] + b[1]) / 2)
    assert torch.equal(out[3], (b[2] + a[0]) / 2) and torch.equal(out[4], out[3])
    assert dataclasses.replace(node, tensor="other").key() == node.key()
    assert dataclasses.replace(node, index=ints(1, 0, 0, 0, 0)).key() != node.key()
