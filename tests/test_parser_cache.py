"""grammar/parser_cache.py: the parser loaded from the cache parses as the one built from merge.lark (trees and
errors alike), and a cache that is missing, damaged or not writable only costs the build."""
from __future__ import annotations

import hashlib
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
    except UnexpectedInput as e:  # lark's own message lists the expected set in its iteration order: mgc sorts it
        return type(e), str(getattr(e, "token", "")), sorted(getattr(e, "expected", None) or ()), e.line, e.column


def _body(file: Path) -> dict:
    """The tables a cache file holds, after its digest line."""
    return json.loads(file.read_bytes().partition(b"\n")[2])


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
    assert _body(file)["key"]  # written again, whole


def test_tables_damaged_inside_valid_json_are_built_anew(tmp_path, monkeypatch):
    """A file whose JSON still loads but whose tables were changed fails its digest: rebuilt, never trusted."""
    monkeypatch.setenv("MGC_CACHE", str(tmp_path))
    grammar = GRAMMAR.read_text()
    cached_parser(grammar, **OPTIONS)
    (file,) = _files(tmp_path)
    digest, _, body = file.read_bytes().partition(b"\n")
    held = json.loads(body)
    states = held["data"]["parser"]["parser"]["states"]
    states.pop(next(iter(states)))  # a parse state lost
    file.write_bytes(digest + b"\n" + json.dumps(held).encode())
    parser = cached_parser(grammar, **OPTIONS)
    reference = Lark(grammar, **OPTIONS)
    for text in _texts()[:40]:
        assert _outcome(parser, text) == _outcome(reference, text)
    new_digest, _, new_body = file.read_bytes().partition(b"\n")  # written again, whole
    assert new_digest == hashlib.sha256(new_body).hexdigest().encode()
    assert len(json.loads(new_body)["data"]["parser"]["parser"]["states"]) == len(states) + 1


def test_no_home_folder_only_costs_the_build(monkeypatch):
    """With HOME unset and a uid without a passwd entry, the cache folder cannot be named: the parser is built."""
    import mgc.grammar.parser_cache as parser_cache

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(parser_cache, "cache_root", no_home)
    assert cached_parser('start: "a"', parser="lalr").parse("a").data == "start"


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
