"""grammar/parser_cache.py: the parser loaded from the cache parses as the one built from merge.lark (trees and
errors alike), and a cache that is missing, damaged or not writable only costs the build."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lark import Lark
from lark.exceptions import UnexpectedInput

from conftest import REPO
from mgc.grammar.parse import GRAMMAR
from mgc.grammar.parser_cache import cached_parser

OPTIONS = dict(parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _texts() -> list[str]:
    """Every recipe of the repository, whole and damaged in a few ways (for the errors)."""
    out = []
    for f in sorted(REPO.glob("examples/**/*.merge")) + sorted(REPO.glob("tests/fixtures/**/*.merge")):
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        out += [text, text[: len(text) // 2], text + " )", text.replace("(", "", 1), text.replace("=", "==", 1)]
    return out


def _outcome(parser: Lark, text: str):
    try:
        return parser.parse(text)
    except UnexpectedInput as e:
        return type(e), str(e), getattr(e, "expected", None), e.line, e.column


def _files(cache: Path) -> list[Path]:
    return sorted((cache / "grammar").iterdir()) if (cache / "grammar").exists() else []


def test_the_cached_parser_parses_as_the_built_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MGC_CACHE", str(tmp_path))
    grammar = GRAMMAR.read_text()
    built = cached_parser(grammar, **OPTIONS)  # builds and writes the cache
    (file,) = _files(tmp_path)
    loaded = cached_parser(grammar, **OPTIONS)
    assert _files(tmp_path) == [file] and loaded is not built
    reference = Lark(grammar, **OPTIONS)
    texts = _texts()
    assert len(texts) > 100
    for text in texts:
        assert _outcome(loaded, text) == _outcome(reference, text) == _outcome(built, text)
    assert loaded.options.propagate_positions and loaded.options.maybe_placeholders


def test_another_grammar_or_options_get_their_own_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MGC_CACHE", str(tmp_path))
    cached_parser('start: "a"', parser="lalr")
    cached_parser('start: "b"', parser="lalr")
    cached_parser('start: "b"', parser="lalr", propagate_positions=True)
    assert len(_files(tmp_path)) == 3
    assert cached_parser('start: "b"', parser="lalr").parse("b").data == "start"
    with pytest.raises(UnexpectedInput):
        cached_parser('start: "b"', parser="lalr").parse("a")


@pytest.mark.parametrize("damage", [b"", b"{", b"[1, 2]", b'{"key": "x", "data": {}, "memo": {}}', b"\xff\xfe"])
def test_a_damaged_cache_file_is_built_anew(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("MGC_CACHE", str(tmp_path))
    cached_parser('start: "a" "b"', parser="lalr")
    (file,) = _files(tmp_path)
    file.write_bytes(damage)
    assert cached_parser('start: "a" "b"', parser="lalr").parse("ab").data == "start"
    assert json.loads(file.read_bytes())["key"]  # written again, whole


def test_a_cache_that_cannot_be_written_is_not(tmp_path, monkeypatch):
    (tmp_path / "grammar").write_text("a file where the folder would go")
    monkeypatch.setenv("MGC_CACHE", str(tmp_path))
    assert cached_parser('start: "a"', parser="lalr").parse("a").data == "start"
    assert [p.name for p in tmp_path.iterdir()] == ["grammar"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_leaves_no_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "grammar").mkdir()
    (tmp_path / "grammar").chmod(0o500)
    monkeypatch.setenv("MGC_CACHE", str(tmp_path))
    try:
        assert cached_parser('start: "a"', parser="lalr").parse("a").data == "start"
        assert _files(tmp_path) == []
    finally:
        (tmp_path / "grammar").chmod(0o700)
