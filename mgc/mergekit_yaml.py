"""A mergekit configuration's YAML, node by node with each node's line and column (yaml's composer keeps
them), and the refusals: whatever mgc cannot express is an MgcError at the YAML's own file:line:col."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import yaml

from mgc.core.errors import MgcError, Source, Span


class MergekitImportError(MgcError):
    """A mergekit configuration that mgc cannot translate (reported at the YAML's line)."""


@dataclass
class Y:
    """A YAML node: a plain value (dict of str -> Y, list of Y, or a scalar) and where it starts."""

    value: Any
    line: int
    col: int
    end_line: int
    end_col: int


def load_yaml(text: str, name: str) -> list[Y]:
    source = Source(name, text)
    loader = yaml.SafeLoader(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                docs.append(_plain(node, loader, source))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        span = Span(source, mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2) if mark else None
        raise MergekitImportError(f"not valid YAML: {e.problem or e.context}", span) from None
    finally:
        loader.dispose()
    return docs


def _plain(node, loader, source) -> Y:
    s, e = node.start_mark, node.end_mark
    if isinstance(node, yaml.MappingNode):
        value = {}
        for k, v in node.value:
            key = loader.construct_object(k, deep=True)
            value[str(key)] = _plain(v, loader, source)
            value[str(key)].key_mark = (k.start_mark.line + 1, k.start_mark.column + 1, len(str(key)))
    elif isinstance(node, yaml.SequenceNode):
        value = [_plain(v, loader, source) for v in node.value]
    else:
        value = loader.construct_object(node, deep=True)
    y = Y(value, s.line + 1, s.column + 1, e.line + 1, e.column + 1)
    y.source = source
    return y


def _span(y: Y, key: bool = False) -> Span:
    if key and hasattr(y, "key_mark"):
        line, col, width = y.key_mark
        return Span(y.source, line, col, line, col + width)
    end_col = y.end_col if y.end_line == y.line else len(y.source.line(y.line)) + 1
    return Span(y.source, y.line, y.col, y.line, max(end_col, y.col + 1))


def refuse(y: Y, message: str, hint: Optional[str] = None, key: bool = False):
    raise MergekitImportError(message, _span(y, key), hint)


def mapping(y: Y, what: str) -> dict[str, Y]:
    if not isinstance(y.value, dict):
        refuse(y, f"{what} must be a mapping")
    return y.value


def string(y: Y, what: str) -> str:
    if not isinstance(y.value, str) or not y.value:
        refuse(y, f"{what} must be a string")
    return y.value
