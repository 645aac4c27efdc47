"""Edits of a recipe's text at the spans of its AST, everything else (comments, layout) left as it is: used by
`mgc recipe --absolute` (runtime/provenance.py) and to bind free parameters (compiler/search_space.py)."""
from __future__ import annotations

from typing import Iterable

from mgc.core.errors import Span


class SpanText:
    """A recipe's text, with the character offsets of its spans (lark counts lines by \\n and columns from 1)."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [0]
        for line in text.split("\n"):
            self.starts.append(self.starts[-1] + len(line) + 1)

    def offsets(self, span: Span) -> tuple[int, int]:
        """[begin, end) of `span` in the text."""
        return self.starts[span.line - 1] + span.col - 1, self.starts[span.end_line - 1] + span.end_col - 1

    def replaced(self, edits: Iterable[tuple[int, int, str]]) -> str:
        """The text with each [begin, end) replaced by its new text (edits must not overlap; repeats count once)."""
        text = self.text
        for begin, end, new in sorted(set(edits), reverse=True):
            text = text[:begin] + new + text[end:]
        return text
