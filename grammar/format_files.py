"""The files `mgc fmt` reads and writes: the recipes a list of paths names, a recipe's text, and an atomic
rewrite in place."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mgc.core.errors import RecipeSyntaxError
from mgc.grammar.parse import _decode_error


def recipe_files(paths) -> list:
    """The recipes named: files as given, folders as every *.merge below them (sorted); `-` as itself."""
    out = []
    for p in paths:
        p = Path(p)
        if str(p) != "-" and p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.merge") if q.is_file()))
        else:
            out.append(p)
    return out


def read_recipe(path) -> str:
    """A recipe file's text; a RecipeSyntaxError (as parse_file raises it) if it cannot be read or decoded."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as e:
        raise RecipeSyntaxError(f"cannot read recipe {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _decode_error(data, e, str(path)) from None


def write_atomically(path, text: str) -> None:
    """Replace a file's contents: a temporary file beside it, then a rename (its mode kept)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".fmt", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
