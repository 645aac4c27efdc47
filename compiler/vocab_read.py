"""A checkpoint's vocabulary (token string by id), read from its tokenizer files at check time.

Whether two checkpoints' vocabularies agree is first decided from the files that define token ids (their bytes):
equal files need no tokenizer package. Reading the tokens themselves takes the `tokenizers` package
(tokenizer.json) or `transformers` (other tokenizers), both in mgc[eval].
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mgc.core.errors import CheckpointError, MgcError, Span

# the files that fix which token has which id (tokenizer_config.json also holds chat templates and settings)
ID_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
ADDED_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
INSTALL_HINT = "pip install 'mgc[eval]' (or pip install tokenizers transformers)"


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[Optional[str], ...]  # by id; None for an id no token has
    ids: dict = field(compare=False)  # token -> id
    added: dict = field(compare=False)  # token -> AddedToken fields, for the tokenizer's added tokens

    def __len__(self) -> int:
        return len(self.tokens)


def fingerprint(ckpt, files: Optional[dict[str, Path]] = None) -> Optional[str]:
    """A digest of the files that fix token ids (those in the folder, unless `files` gives them), or None."""
    if files is None:
        files = {n: ckpt.path / n for n in ID_FILES if (ckpt.path / n).is_file()}
    found = [(n, files[n]) for n in ID_FILES if n in files]
    if not found:
        return None
    try:
        return "".join(f"{name}:{_digest(f)};" for name, f in found)
    except OSError as e:
        raise CheckpointError(f"{ckpt.path}: cannot read its tokenizer: {e.strerror or e}") from None


_DIGESTS: dict[tuple, str] = {}


def _digest(file: Path) -> str:
    """sha256 of a file, remembered while it is unchanged (a tokenizer.json can be tens of MB)."""
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(file.read_bytes()).hexdigest()
    return _DIGESTS[key]


_CACHE: dict[tuple[Path, str], Vocabulary] = {}


def read_vocabulary(ckpt, span: Optional[Span]) -> Optional[Vocabulary]:
    """The checkpoint's vocabulary, or None when it has no tokenizer files. (A checkpoint on the hub fetches its
    tokenizer files here: a check needs them only where vocabularies are aligned.)"""
    files = {p.name: p for p in ckpt.tokenizer_files()}
    key = fingerprint(ckpt, files)
    if key is None:
        return None
    if (ckpt.path, key) not in _CACHE:
        if "tokenizer.json" in files:
            vocab = _from_tokenizer_json(files, span)
        else:
            vocab = _from_transformers(ckpt, files, span)
        _CACHE[(ckpt.path, key)] = vocab
    return _CACHE[(ckpt.path, key)]


def _added(token) -> dict:
    out = {k: bool(getattr(token, k)) for k in ADDED_FIELDS if k != "content"}
    out["content"] = str(token.content)
    return out


def _build(ids: dict[str, int], added: dict[int, dict], path: Path, span) -> Vocabulary:
    size = max(list(ids.values()) + list(added), default=-1) + 1
    tokens: list[Optional[str]] = [None] * size
    for token, i in ids.items():
        if not isinstance(i, int) or i < 0:
            raise CheckpointError(f"{path}: token {token!r} has id {i!r}", span)
        tokens[i] = token
    for i, spec in added.items():
        tokens[i] = spec["content"]
    by_token = {t: i for i, t in enumerate(tokens) if t is not None}
    return Vocabulary(tuple(tokens), by_token, {spec["content"]: spec for spec in added.values()})


def _from_tokenizer_json(files: dict[str, Path], span) -> Vocabulary:
    file = files["tokenizer.json"]
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MgcError(f"reading the vocabulary of {file.parent} needs the tokenizers package", span, INSTALL_HINT) from None
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the library's own errors: a damaged or unsupported file
        raise CheckpointError(f"{file}: cannot read the tokenizer: {str(e).splitlines()[0] if str(e) else e}", span) from None
    added = {i: _added(t) for i, t in tok.get_added_tokens_decoder().items()}
    for i, spec in _config_added(files.get("tokenizer_config.json")).items():  # transformers adds these too
        added.setdefault(i, spec)
    return _build(tok.get_vocab(with_added_tokens=True), added, file, span)


def _config_added(file: Optional[Path]) -> dict[int, dict]:
    """tokenizer_config.json's added_tokens_decoder, by id."""
    try:
        config = json.loads(file.read_text()) if file is not None else {}
    except (OSError, ValueError):
        return {}
    found = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    out = {}
    for key, spec in (found or {}).items() if isinstance(found, dict) else ():
        if str(key).isdigit() and isinstance(spec, dict) and isinstance(spec.get("content"), str):
            out[int(key)] = {k: spec.get(k, k == "normalized") for k in ADDED_FIELDS}
    return out


def _from_transformers(ckpt, files: dict[str, Path], span) -> Vocabulary:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MgcError(f"reading the vocabulary of {ckpt.path} needs the transformers package", span, INSTALL_HINT) from None
    try:
        folder = next(iter(files.values())).parent
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds for a tokenizer it cannot build
        raise CheckpointError(f"{ckpt.path}: cannot load its tokenizer: {str(e).splitlines()[0] if str(e) else e}", span,
                              "mgc reads tokenizers with transformers' AutoTokenizer") from None
    added = {i: _added(t) for i, t in getattr(tok, "added_tokens_decoder", {}).items()}
    return _build(dict(tok.get_vocab()), added, ckpt.path, span)


def tokenizers_available() -> bool:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True
