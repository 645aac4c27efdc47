"""One error root for mgc. Every error that a user can cause renders like a compiler's:

    recipe.merge:7:31: error: karcher() got an unknown parameter 'weigths'
        experts = karcher(code, math, weigths = [1, 1])
                                      ^^^^^^^
    hint: did you mean 'weights'?
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Optional


@dataclass(frozen=True, eq=False)
class Source:
    """A recipe's text and the name it is reported under (hashed by identity)."""

    name: str
    text: str

    def line(self, n: int) -> str:
        lines = self.text.split("\n")  # as lark counts lines: \n only
        return lines[n - 1].rstrip("\r") if 0 < n <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    source: Source = field(repr=False, compare=False)
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.source.name}:{self.line}:{self.col}"

    def excerpt(self) -> str:
        text = self.source.line(self.line)
        end = self.end_col if self.end_line == self.line else len(text) + 1
        width = max(1, end - self.col)
        return f"    {text}\n    {' ' * (self.col - 1)}{'^' * width}"


def end_of(source: Source) -> Span:
    """The place just after a recipe's last non-blank line: where something missing is reported."""
    lines = source.text.split("\n")
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    col = len(lines[-1].rstrip("\r")) + 1
    return Span(source, len(lines), col, len(lines), col + 1)


class MgcError(Exception):
    """The root of every error mgc reports to a user."""

    kind = "error"

    def __init__(self, message: str, span: Optional[Span] = None, hint: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint

    def render(self) -> str:
        where = f"{self.span}: " if self.span else ""
        out = [f"{where}{self.kind}: {self.message}"]
        if self.span:
            out.append(self.span.excerpt())
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class MgcWarning(MgcError):
    """Not an error: something the user should know about a recipe that runs (rendered like one)."""

    kind = "warning"


class RecipeSyntaxError(MgcError):
    """The recipe does not parse."""


class RecipeNameError(MgcError):
    """An unknown name, operator, parameter or selector; a cycle through `def`."""


class RecipeTypeError(MgcError):
    """A value of the wrong kind or range, a wrong arity, tensor shapes that disagree."""


class CheckpointError(MgcError):
    """A checkpoint folder or file is missing, unreadable, corrupt or inconsistent."""


class MergeRuntimeError(MgcError):
    """Something went wrong while tensors were being merged (a NaN, a device failure)."""


class OutputError(MgcError):
    """The output folder cannot be written as asked."""


class MgcErrors(MgcError):
    """Several errors found in one pass, reported together."""

    def __init__(self, errors: Iterable[MgcError]):
        self.errors = list(errors)
        super().__init__(f"{len(self.errors)} errors")

    def render(self) -> str:
        n = len(self.errors)
        body = "\n\n".join(e.render() for e in self.errors)
        return body + (f"\n\n{n} errors." if n > 1 else "")


def did_you_mean(word: str, candidates: Iterable[str]) -> Optional[str]:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
