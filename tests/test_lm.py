"""mgc.lm: `mgc eval`, `mgc diagnose` and `fisher()` read the same documents from a file, load and tokenize the
same way, pick the same device and fail the same way without transformers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mgc.diagnose as diagnose
import mgc.evaluate as evaluate
import mgc.fisher as fz
import mgc.lm as lm
from mgc.core.errors import MgcError
from mgc.compiler import fisher_cache

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"

FILES = {
    "no blank line": b"def f(x):\n    return x\nprint(f(2))\n",
    "paragraphs": b"a b\n  c d\n\n\n e f\n \t\ng\n",
    "trailing whitespace": b"first doc  \nline two\t\n\nsecond \n",
    "crlf and a byte-order mark": b"\xef\xbb\xbfone\r\ntwo\r\n\r\nthree\r\n",
    "lone carriage returns": b"one\rtwo\r\rthree",
}


@pytest.mark.parametrize("name", FILES)
def test_eval_diagnose_and_fisher_read_the_same_documents(tmp_path, name):
    f = tmp_path / "data.txt"
    f.write_bytes(FILES[name])
    docs = evaluate.read_data(f).texts
    assert docs == diagnose.read_data(f).documents() == fz.read_documents(f) == lm.read_documents(f)
    assert fz.inspect_data(f).documents == len(docs)


def test_the_document_rule():
    split = lm.split_documents
    assert split("l1\nl2\n  l3\n") == ["l1\nl2\n  l3"]  # no blank line: one document
    assert split("a  \n b \n\n \t \nc\t\n") == ["a  \n b", "c"]  # indentation kept, trailing whitespace dropped
    assert split("x\r\ny\r\rz") == ["x\ny", "z"]
    assert split("\n \n") == [] and split("") == []


def test_fisher_keys_of_the_former_estimator_are_never_reused(tmp_path, monkeypatch):
    """Documents and tokens changed with the shared rule, so the estimator version, and with it every key, did."""
    data = tmp_path / "l.txt"
    data.write_bytes(FILES["no blank line"])
    key = fz.fisher_key(MODELS / "code", data)
    monkeypatch.setattr(fisher_cache, "ESTIMATOR_VERSION", 1)
    assert fz.fisher_key(MODELS / "code", data) != key


def test_one_loader_tokenizer_device_and_require():
    for module in (evaluate, diagnose, fz):
        assert module.load is lm.load and module.require is lm.require and module.resolve_device is lm.resolve_device
    assert evaluate.encode_texts is diagnose.encode_texts is lm.encode_texts and fz.encode_text is lm.encode_text


def test_device_errors_name_the_device():
    assert lm.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MgcError, match="unknown device 'gpu0'"):
        lm.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(MgcError, match="cuda:1 was asked for"):
            lm.resolve_device("cuda:1")


def test_missing_transformers_is_the_same_error_everywhere(tmp_path, monkeypatch):
    (tmp_path / "d.txt").write_text("hello world\n")
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    for call in (lambda: evaluate.load(MODELS / "code"), lambda: fz.estimate_fisher(MODELS / "code", tmp_path / "d.txt")):
        with pytest.raises(lm.MissingExtraError) as info:
            call()
        assert info.value.hint == lm.EXTRA_HINT


def test_fisher_scores_the_tokens_eval_scores(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    f = tmp_path / "d.txt"
    f.write_text("def add(a, b):\n    return a + b\n\nthe quick brown fox jumps over the lazy dog\n\nx\n")
    seen = []
    monkeypatch.setattr(fz, "encode_text", lambda *a: seen.append(lm.encode_text(*a)) or seen[-1])
    fz.estimate_fisher(MODELS / "code", f, samples=8, max_length=9, device="cpu")
    _, tokenizer = lm.load(MODELS / "code")
    expected = evaluate.encode_texts(tokenizer, evaluate.read_data(f).texts, 9)
    assert [it.ids for it in seen if it is not None] == [it.ids for it in expected]
    assert expected[0].ids[0] == tokenizer.bos_token_id and any(it.truncated for it in expected)
