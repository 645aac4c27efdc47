"""The parts of a recipe's source that its AST does not keep, for `mgc fmt` (mgc/grammar/format.py): its
comments, and where a trailing comma closes a bracket (`f(a, b,)`: kept one item a line)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Comment:
    line: int
    col: int
    text: str


def scan(text: str):
    """The comments of a recipe, and the set of (line, col) of closing brackets preceded by a comma.
    Strings are skipped as the grammar lexes them (no newline inside a string)."""
    comments: list[Comment] = []
    magic: set[tuple[int, int]] = set()
    prev = ""
    line, col, i, n = 1, 1, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line, col, i = line + 1, 1, i + 1
            continue
        if ch == '"':
            j = i + 1
            while j < n and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            col += j - i
            i = j
            prev = '"'
            continue
        if ch == "#":
            j = text.find("\n", i)
            j = n if j < 0 else j
            comments.append(Comment(line, col, text[i:j].rstrip()))
            col += j - i
            i = j
            continue
        if not ch.isspace():
            if ch in ")]}" and prev == ",":
                magic.add((line, col))
            prev = ch
        col += 1
        i += 1
    return comments, magic
