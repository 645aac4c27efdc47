"""The recipe grammar's LALR parser, kept once built. Building it from merge.lark takes about 30 ms, a tenth of
`mgc check`'s start-up; loading the tables lark computed takes about 3 ms. They are kept as JSON (lark's own
`cache=` option pickles, and loading a pickle can run code) under ``$MGC_CACHE/grammar/`` (``~/.cache/mgc``),
named by a digest of the grammar, the options and lark's version, so an edited grammar or another lark builds
anew. The cache is only ever a shortcut: a file that is missing, unreadable or not lark's tables is ignored and the
parser built; one that cannot be written is not written."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import lark
from lark import Lark
from lark.grammar import Rule
from lark.lexer import TerminalDef

from mgc.core.paths import cache_root

FORMAT = 2  # of the cache file: bumped when what it holds changes


def cached_parser(grammar: str, **options) -> Lark:
    """Lark(grammar, **options), from the cache when it holds this grammar's parser (only for parser="lalr")."""
    key = hashlib.sha256(json.dumps([FORMAT, lark.__version__, grammar, sorted(options.items())]).encode()).hexdigest()
    path = None
    try:  # the file: the sha256 of the tables' JSON, a newline, the JSON
        path = cache_root() / "grammar" / f"{key[:32]}.json"
        digest, _, body = path.read_bytes().partition(b"\n")
        if digest.decode() == hashlib.sha256(body).hexdigest():
            held = json.loads(body, object_pairs_hook=_int_keys)
            if held["key"] == key:
                return Lark.__new__(Lark)._load({"data": held["data"], "memo": held["memo"]})
    except Exception:  # no home folder, missing, unreadable, cut short, damaged, or another lark's: build it
        pass
    parser = Lark(grammar, **options)
    try:
        data, memo = parser.memo_serialize([TerminalDef, Rule])
        body = json.dumps({"key": key, "data": data, "memo": memo}).encode()
        if path is not None:
            _write(path, hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    except Exception:  # a read-only home, a full disk, tables JSON cannot hold: the parser still works
        pass
    return parser


def _int_keys(pairs: list) -> dict:
    """JSON's object keys are strings; lark's tables key states, tokens and its memo by int (no name is all digits)."""
    return {int(k) if k.isdigit() else k: v for k, v in pairs}


def _write(path: Path, raw: bytes) -> None:
    """Renamed into place once written: a reader (another process) sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
