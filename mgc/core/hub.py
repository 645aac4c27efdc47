"""Checkpoints from the Hugging Face hub, named explicitly as `hf://org/name[@revision]` (opened by hub_checkpoint.py).

Nothing else is ever fetched: `model("org/name")` is a local path, so a typo in a local path cannot
download an unrelated public repository. A missing local path gets a did-you-mean from the folders
beside it, or, when it has the shape of a hub id, a hint to write the hf:// form.
"""
from __future__ import annotations

import difflib
import itertools
import os
import re
from pathlib import Path
from typing import MutableMapping, Optional

from mgc.core.errors import CheckpointError, Span
from mgc.core.paths import show_path

PREFIX = "hf://"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
MAX_SIBLINGS = 1000  # folders looked at for a did-you-mean


def looks_like_hub_id(text: str) -> bool:
    """Whether `model(text)` asks for the hub: only the explicit `hf://org/name[@revision]` does."""
    return text.startswith(PREFIX) and bool(HUB_ID.match(text[len(PREFIX):]))


def _bare_hub_shape(text: str, base_dir: Path) -> bool:
    """`org/name[@rev]` written without hf://, whose first folder does not exist here."""
    if text.startswith(LOCAL_PREFIXES) or not HUB_ID.match(text):
        return False
    try:
        return not (base_dir / text.split("/", 1)[0]).exists()
    except (OSError, ValueError):
        return False


def open_checkpoint(text: str, span: Optional[Span], opened: MutableMapping[Path, object]):
    """The checkpoint `hf://org/name[@revision]` names, checked from its config, index and shard headers only
    (hub_checkpoint.py); `opened` holds the checkpoints already open, by path."""
    if not looks_like_hub_id(text):
        raise CheckpointError(f"'{text}' is not a hub id", span, 'write model("hf://org/name") or model("hf://org/name@revision")')
    from mgc.core.hub_checkpoint import open_remote

    try:
        return open_remote(text, opened)
    except CheckpointError as err:
        err.span = err.span or span
        raise


def not_found(text: str, base_dir: str | os.PathLike, span: Optional[Span] = None) -> CheckpointError:
    """The error for `model(text)` when nothing is at that path."""
    shown = text if len(text) <= 200 else f"{text[:100]}...{text[-100:]}"
    if text.startswith(PREFIX):
        return CheckpointError(
            f"'{shown}' is not a hub id", span, 'a hub id is written hf://org/name or hf://org/name@revision'
        )
    base_dir = Path(base_dir)
    hint = _sibling_hint(text, base_dir)
    if hint is None and _bare_hub_shape(text, base_dir):
        hint = f'to fetch it from the Hugging Face hub, write model("{PREFIX}{text}")'
    where = looked_for(text, base_dir)
    return CheckpointError(f"no checkpoint folder at '{shown}'", span, where + (f"; {hint}" if hint else ""))


def looked_for(text: str, base_dir: Path) -> str:
    """Where a missing path was looked for: the absolute path, and for a relative one the rule that made it."""
    try:
        where = os.path.normpath(base_dir / os.path.expanduser(text))
    except (TypeError, ValueError):
        return "paths are relative to the recipe's folder"
    shown = show_path(where)
    relative = not os.path.isabs(os.path.expanduser(text))
    return f"looked for '{shown}'" + (" (paths are relative to the recipe's folder)" if relative else "")


def _sibling_hint(text: str, base_dir: Path) -> Optional[str]:
    """'did you mean ...?' for the first missing folder of the path, from the folders beside it."""
    try:
        path = Path(os.path.normpath(base_dir / os.path.expanduser(text)))
        missing = path
        while not missing.parent.exists():
            if missing.parent == missing:
                return None
            missing = missing.parent
        with os.scandir(missing.parent) as entries:
            siblings = [e.name for e in itertools.islice(entries, MAX_SIBLINGS) if e.is_dir()]
    except (OSError, ValueError):
        return None
    close = difflib.get_close_matches(missing.name, siblings, n=1, cutoff=0.6)
    if not close:
        return None
    suggestion = (missing.parent / close[0] / path.relative_to(missing)).as_posix()
    if not os.path.isabs(text) and not text.startswith("~"):
        try:
            suggestion = Path(os.path.relpath(suggestion, base_dir)).as_posix()
        except ValueError:
            pass
    return f"did you mean '{suggestion}'?"
