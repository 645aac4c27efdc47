"""mgc.evaluate and `mgc eval`: perplexity, teacher-forced answer accuracy, KL to teachers."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from mgc.cli import main  # noqa: E402
from mgc.core.errors import CheckpointError  # noqa: E402
from mgc.evaluate import (  # noqa: E402
    DataError, Item, MissingExtraError, Record, answer_accuracy, encode_records, evaluate, load, mean_kl, perplexity,
    read_data, token_stats,
)

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
BASE, CODE = str(MODELS / "base"), str(MODELS / "code")

TEXT = """def add(a, b):
    return a + b

The quick brown fox jumps over the lazy dog.


x = [i * i for i in range(10)]
"""
RECORDS = [
    {"prompt": "2 + 2 = ", "answer": "4"},
    {"prompt": "def square(x):\n    return", "answer": " x * x"},
    {"prompt": "The capital of France is", "answer": " Paris."},
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def base():
    return load(BASE)


@pytest.fixture(scope="module")
def code():
    return load(CODE)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    (d / "docs.txt").write_text(TEXT)
    (d / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return d


def _direct_nll(model, ids: list[int]) -> tuple[float, int]:
    """Summed NLL of ids[1:] given the prefixes, computed with torch directly, one unpadded sequence."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")), len(ids) - 1


# ------------------------------------------------------------------------------------------ data


def test_read_text_documents_are_separated_by_blank_lines(files):
    data = read_data(files / "docs.txt")
    assert data.kind == "text"
    assert data.texts == ["def add(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog.",
                          "x = [i * i for i in range(10)]"]


def test_read_jsonl_records(files):
    data = read_data(files / "qa.jsonl")
    assert data.kind == "qa" and len(data) == 3
    assert data.records[1] == Record("def square(x):\n    return", " x * x", 2)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a" "answer": "b"}', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"prompt": "a"}', 'no "answer" field'),
    ('{"prompt": 3, "answer": "b"}', '"prompt" must be a string'),
    ('{"prompt": "a", "answer": ""}', '"answer" is empty'),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok", "answer": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_data(f)
    text = e.value.render()
    assert f"{f}:3:" in text and message in text and line in text


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_data(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no documents"):
        read_data(tmp_path / "empty.txt")


# ---------------------------------------------------------------------------------------- models


def test_load_gives_float32_eval_model(base):
    model, tokenizer = base
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.num_hidden_layers == 8 and tokenizer.bos_token_id == 1


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder") as e:
        load(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path / "noconfig")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text((MODELS / "base" / "config.json").read_text())
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pickle") as e:
        load(tmp_path / "pickle")
    assert "--allow-pickle" in e.value.render()


def test_missing_transformers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(MissingExtraError) as e:
        load(BASE)
    assert "pip install 'mgc[eval]'" in e.value.render()


# --------------------------------------------------------------------------------------- metrics


def test_perplexity_is_exp_of_mean_nll_computed_directly(base):
    model, tokenizer = base
    texts = ["hello world", "def f(x): return x * 2"]
    total, count = 0.0, 0
    for t in texts:  # BOS + tokens; BOS is context only
        nll, n = _direct_nll(model, [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"])
        total, count = total + nll, count + n
    # batch_size=2 pads the shorter text: padding must not change anything
    got = perplexity(model, tokenizer, texts, batch_size=2)
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_truncates_to_max_length(base):
    model, tokenizer = base
    text = "the quick brown fox jumps over the lazy dog " * 4
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    nll, n = _direct_nll(model, ids[:6])
    assert perplexity(model, tokenizer, [text], max_length=6) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_answer_accuracy_on_greedy_answers(base):
    """A record whose answer tokens are the model's own greedy predictions scores 1; one wrong token 0."""
    model, _ = base
    ids = [1, 263, 79, 79, 82]
    with torch.no_grad():
        for _ in range(3):  # greedy continuation, teacher-forced
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    right = Item(list(ids), start=5)
    wrong = Item(ids[:-1] + [(ids[-1] + 1) % 512], start=5)
    s = token_stats(model, [right, wrong], batch_size=2)
    assert (s.tokens, s.correct, s.sequences, s.exact) == (6, 5, 2, 1)


def test_answer_accuracy_scores_only_the_answer(base):
    model, tokenizer = base
    r = answer_accuracy(model, tokenizer, RECORDS)
    assert r["records"] == 3 and r["truncated"] == 0
    # the prompt's trailing space moves to the answer: "2 + 2 = " + "4" is scored as " 4"
    answers = [" 4", " x * x", " Paris."]
    answer_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    assert r["answer_tokens"] == answer_tokens
    assert 0 <= r["token_accuracy"] <= 1 and 0 <= r["exact_match"] <= 1 and math.isfinite(r["answer_nll"]) and r["answer_nll"] > 0
    # answer NLL = NLL of the answer tokens given BOS + prompt, computed directly on the first record
    item = encode_records(tokenizer, RECORDS[:1], 512)[0]
    x = torch.tensor([item.ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
    direct = -sum(float(logp[t - 1, item.ids[t]]) for t in range(item.start, len(item.ids))) / (len(item.ids) - item.start)
    assert answer_accuracy(model, tokenizer, RECORDS[:1])["answer_nll"] == pytest.approx(direct, rel=1e-5)


def test_records_keep_the_answer_when_truncated(base):
    _, tokenizer = base
    record = Record(("a long prompt " * 20).rstrip(), " answer", 1)
    item = encode_records(tokenizer, [record], 8)[0]
    answer = tokenizer(" answer", add_special_tokens=False)["input_ids"]
    assert item.truncated and len(item.ids) == 8 and item.ids[0] == tokenizer.bos_token_id
    assert item.ids[item.start:] == answer


def test_kl_of_a_model_to_itself_is_zero_and_positive_between_models(base, code):
    model, tokenizer = base
    texts = read_data_texts()
    assert mean_kl(model, model, tokenizer, texts) == pytest.approx(0.0, abs=1e-7)
    kl = mean_kl(code[0], model, tokenizer, texts)
    assert kl > 0 and math.isfinite(kl)
    assert mean_kl(model, model, tokenizer, RECORDS) == pytest.approx(0.0, abs=1e-7)
    assert mean_kl(code[0], model, tokenizer, RECORDS) > 0


def test_kl_matches_a_direct_computation(base, code):
    model, tokenizer = base
    teacher = code[0]
    ids = [1] + tokenizer("hello world", add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        lp_t = torch.log_softmax(teacher(x).logits[0, :-1].double(), -1)
        lp_m = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
    direct = float(torch.nn.functional.kl_div(lp_m, lp_t, log_target=True, reduction="sum")) / (len(ids) - 1)
    assert mean_kl(teacher, model, tokenizer, ["hello world"]) == pytest.approx(direct, rel=1e-6)


def read_data_texts() -> list[str]:
    return ["def add(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog."]


# ------------------------------------------------------------------------------------ evaluate, CLI


def test_evaluate_text_with_teachers(files):
    rows = evaluate([BASE, CODE], files / "docs.txt", teachers=[BASE, CODE], device="cpu")
    assert [r["model"] for r in rows] == [BASE, CODE]
    for r in rows:
        assert r["kind"] == "text" and r["documents"] == 3 and r["tokens"] > 0
        assert math.isfinite(r["perplexity"]) and r["perplexity"] == pytest.approx(math.exp(r["nll"]))
        assert set(r["kl"]) == {BASE, CODE} and r["mean_kl"] == pytest.approx(sum(r["kl"].values()) / 2)
    assert rows[0]["kl"][BASE] == pytest.approx(0, abs=1e-7) and rows[1]["kl"][CODE] == pytest.approx(0, abs=1e-7)
    assert rows[0]["kl"][CODE] > 0 and rows[1]["kl"][BASE] > 0


def test_cli_eval_json_on_records(files):
    result = CliRunner().invoke(main, ["eval", BASE, CODE, "--data", str(files / "qa.jsonl"), "--teachers", BASE, CODE,
                                       "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 2 and all(r["kind"] == "qa" and r["records"] == 3 for r in rows)
    for r in rows:
        for key in ("token_accuracy", "exact_match", "answer_nll", "mean_kl"):
            assert math.isfinite(r[key])
        assert list(r["kl"]) == [BASE, CODE]


def test_cli_eval_table(files):
    result = CliRunner().invoke(main, ["eval", BASE, "--data", str(files / "docs.txt"), "-t", CODE, "--max-length", "8"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"data: {files / 'docs.txt'} (3 documents")
    assert lines[1].split() == ["model", "perplexity", "NLL/token", "KL(code)", "mean", "KL"]
    assert lines[3].startswith(BASE) and len(lines[3].split()) == 5
    assert "cut" in result.output  # two documents are longer than 8 tokens


def test_cli_eval_reports_errors(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n')
    result = CliRunner().invoke(main, ["eval", BASE, "--data", str(bad)])
    assert result.exit_code == 1 and f"{bad}:2:" in result.output
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "missing"), "--data", str(files / "docs.txt")])
    assert result.exit_code == 1 and "missing: no such checkpoint folder" in result.output
