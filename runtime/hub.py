"""Checkpoints named by a Hugging Face hub id (`org/name`), fetched when no such local folder exists."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from mgc.compiler.errors import CheckpointError, Span

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def fetch(repo: str, span: Optional[Span] = None) -> Path:
    """The local snapshot folder of `org/name[@revision]` (safetensors, configs and tokenizer files only)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"no checkpoint folder at '{repo}'", span, "to fetch it from the hub, pip install huggingface_hub"
        ) from None
    repo_id, _, revision = repo.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=PATTERNS))
    except Exception as e:  # network, auth and not-found errors come in many types
        raise CheckpointError(
            f"no checkpoint folder at '{repo}', and the hub could not provide it: {type(e).__name__}: {e}".split("\n")[0],
            span, "check the path, or the hub id and your connection (HF_HUB_OFFLINE=1 uses only the local cache)",
        ) from None
