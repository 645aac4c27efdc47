"""Checkpoints from the Hugging Face hub, named explicitly as `hf://org/name[@revision]`.

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
from typing import Optional

from mgc.core.errors import CheckpointError, Span

PREFIX = "hf://"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
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


def fetch(repo: str, span: Optional[Span] = None) -> Path:
    """The local snapshot folder of `hf://org/name[@revision]` (safetensors, configs and tokenizer files only)."""
    if not looks_like_hub_id(repo):
        raise CheckpointError(f"'{repo}' is not a hub id", span, 'write model("hf://org/name") or model("hf://org/name@revision")')
    repo_id, _, revision = repo[len(PREFIX):].partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"cannot fetch '{repo}' from the hub: huggingface_hub is not installed", span, "pip install huggingface_hub"
        ) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=PATTERNS))
    except Exception as e:  # network, auth and not-found errors come in many types
        raise CheckpointError(
            f"the hub could not provide '{repo}': {type(e).__name__}: {e}".split("\n")[0],
            span, "check the hub id and your connection (HF_HUB_OFFLINE=1 uses only the local cache)",
        ) from None


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
    return CheckpointError(f"no checkpoint folder at '{shown}'", span, hint or "paths are relative to the working directory")


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
