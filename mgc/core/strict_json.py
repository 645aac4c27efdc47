"""JSON read from checkpoint files, with every fault a CheckpointError saying where and what."""
from __future__ import annotations

import json
from typing import Optional

from mgc.core.errors import CheckpointError, Span


class _JsonRejected(ValueError):
    """Raised from inside json.loads by the strict hooks below."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _JsonRejected(f"the key {key!r} appears twice in one object")
        obj[key] = value
    return obj


def _no_constant(name: str):
    raise _JsonRejected(f"{name} is not a JSON value")


def loads(raw: bytes, where: str, what: str, span: Optional[Span] = None, *, strict: bool = True,
          must_start: str = "") -> object:
    """JSON from UTF-8 bytes, or a CheckpointError `where: what ...`. `strict` refuses what Python's json
    would otherwise accept: duplicate keys (the last would silently win) and NaN/Infinity."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: {what} is not UTF-8 text (invalid byte at offset {e.start})", span) from None
    if must_start and not text.startswith(must_start):
        raise CheckpointError(f"{where}: {what} does not start with '{must_start}' ({text[:16]!r})", span)
    hooks = {"object_pairs_hook": _unique_keys, "parse_constant": _no_constant} if strict else {}
    try:
        return json.loads(text, **hooks)
    except RecursionError:
        raise CheckpointError(f"{where}: {what} is nested too deeply to parse (deeper than any real one)", span) from None
    except _JsonRejected as e:
        raise CheckpointError(f"{where}: {what} is not valid: {e}", span) from None
    except ValueError as e:  # JSONDecodeError, and integers longer than Python's digit limit
        raise CheckpointError(f"{where}: {what} is not valid JSON: {e}", span) from None


def json_type(value: object) -> str:
    """What a JSON value is, for a message: "an object", "a list", "null", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )
