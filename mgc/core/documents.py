"""Text data files as documents, the one rule `mgc eval`, `mgc diagnose` and `fisher()` share.

A plain-text file is UTF-8 (a leading byte-order mark is dropped); its documents are runs of non-blank lines
separated by one or more blank lines (lines that are empty or only whitespace). A document's lines are joined
with "\\n" (line breaks may be \\n, \\r\\n or \\r); its leading indentation is kept and its trailing whitespace
dropped. A file without a blank line is one document.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Union

from mgc.core.errors import MgcError


class DataError(MgcError):
    """A data file is missing, empty or malformed."""


def read_text(path: Union[str, Path]) -> str:
    """A data file's text: UTF-8 without a byte-order mark, line breaks turned into "\\n"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        return decode_text(path.read_bytes())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text: {e}") from None


def decode_text(raw: bytes) -> str:
    """UTF-8 bytes as text without a byte-order mark, line breaks turned into "\\n"."""
    return raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")


def split_documents(text: str) -> list[str]:
    """The documents of a plain-text file (see the module docstring): blank-line-separated paragraphs."""
    docs, current = [], []
    for line in re.split(r"\r\n|\r|\n", text):
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current).rstrip())
            current = []
    if current:
        docs.append("\n".join(current).rstrip())
    return docs


def read_documents(path: Union[str, Path]) -> list[str]:
    return split_documents(read_text(path))
