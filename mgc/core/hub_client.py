"""The hub, through huggingface_hub only: a revision pinned to its commit, files downloaded into the hub's cache,
and byte ranges of a file read without downloading it. Every failure is a CheckpointError with a hint.

huggingface_hub itself reads HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and HF_HOME / HF_HUB_CACHE; mgc sets none of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mgc.core.errors import CheckpointError

SHA = re.compile(r"[0-9a-f]{40}")
OFFLINE_HINT = "unset HF_HUB_OFFLINE to fetch it, or check HF_HOME / HF_HUB_CACHE"


def hf():
    """The huggingface_hub module, or a CheckpointError saying how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            "hf:// checkpoints need the huggingface_hub package, which is not installed",
            hint="pip install huggingface_hub (mgc depends on it: reinstalling mgc installs it too)",
        ) from None
    return huggingface_hub


@dataclass(frozen=True)
class Revision:
    """A repository at one commit: what `hf://repo_id@asked` named when the recipe was checked."""

    repo_id: str
    asked: str
    sha: str
    files: frozenset[str]  # the repository's files at `sha`, as paths inside it
    snapshot: Path  # the hub cache's folder for this commit, where hf_hub_download puts its files
    offline: bool = False  # known from the hub cache alone (HF_HUB_OFFLINE, or the hub out of reach): `files` are
    # those cached, and nothing else can be fetched


def resolve(repo_id: str, asked: str, label: str) -> Revision:
    """`asked` (a branch, a tag or a commit) pinned to its commit sha, with the repository's file list, asked of the
    hub once. Offline (HF_HUB_OFFLINE), or when the hub cannot be reached, the hub cache answers if it can."""
    h = hf()
    storage = _storage(repo_id)
    if offline():
        cached = _cached(repo_id, asked, storage)
        if cached is None:
            raise CheckpointError(f"{label} is not in the local hub cache, and HF_HUB_OFFLINE is set", hint=OFFLINE_HINT)
        return cached
    try:
        info = h.HfApi().model_info(repo_id, revision=asked)
    except Exception as e:  # noqa: BLE001 - translated, never a traceback
        if unreachable(e):
            cached = _cached(repo_id, asked, storage)
            if cached is not None:
                return cached
        raise error(e, label, "the repository") from None
    sha = getattr(info, "sha", None)
    if not isinstance(sha, str) or not SHA.fullmatch(sha):
        raise CheckpointError(
            f"{label}: the hub did not name the commit of revision '{asked}' (got {sha!r:.60})",
            hint=f"is HF_ENDPOINT ({h.constants.ENDPOINT}) a Hugging Face hub?",
        )
    files = frozenset(s.rfilename for s in (info.siblings or ()))
    if asked != sha:
        _remember(storage, asked, sha)
    return Revision(repo_id, asked, sha, files, storage / "snapshots" / sha)


def download(rev: Revision, filename: str, label: str, progress: bool = False) -> Path:
    """`filename` of the pinned commit, from the hub cache or downloaded into it (whole, checked by size)."""
    h = hf()
    try:
        path = h.hf_hub_download(
            rev.repo_id, filename, revision=rev.sha, tqdm_class=None if progress else _Silent,
        )
    except Exception as e:  # noqa: BLE001 - translated, never a traceback
        raise error(e, label, f"'{filename}'") from None
    return Path(path)


def read_range(rev: Revision, filename: str, start: int, length: int, label: str) -> tuple[bytes, Optional[int]]:
    """Bytes start..start+length-1 of `filename` at the pinned commit (fewer where the file ends sooner) and the
    file's size as the server reports it (None if it does not). One GET with a Range header; a server that
    ignores the range is read only as far as the asked bytes."""
    h = hf()
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = h.hf_hub_url(rev.repo_id, filename, revision=rev.sha)
    headers = build_hf_headers()
    headers.update({"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"})
    try:
        with get_session().stream(
            "GET", url, headers=headers, follow_redirects=True, timeout=h.constants.HF_HUB_DOWNLOAD_TIMEOUT,
        ) as r:
            if r.status_code == 416:  # the range starts past the end: the file is shorter than `start`
                return b"", _total(r.headers.get("Content-Range"))
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if r.status_code == 206:
                total = _total(r.headers.get("Content-Range"))
                if _first(r.headers.get("Content-Range")) != start:
                    raise CheckpointError(
                        f"{label}/{filename}: the server sent other bytes than those asked "
                        f"({r.headers.get('Content-Range')!r:.80} for bytes {start}-{start + length - 1})"
                    )
                skip = 0
            else:
                total, skip = _int(r.headers.get("Content-Length")), start
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) >= skip + length:
                    break
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - translated, never a traceback
        raise error(e, label, f"'{filename}'") from None
    return bytes(data[skip:skip + length]), total


def offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub reads it."""
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if is_offline is not None else constants.HF_HUB_OFFLINE)


class _Silent:
    """A progress bar that shows nothing (`tqdm_class` for downloads that should not draw one)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, n=1):
        pass

    def close(self):
        pass


def unreachable(e: BaseException) -> bool:
    """A connection that failed or timed out, or offline mode: not an answer from the hub."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(names & {"TransportError", "OfflineModeIsEnabled"})


def error(e: Exception, label: str, what: str) -> CheckpointError:
    """huggingface_hub's exception `e`, raised while asking for `what` of `label`, as a CheckpointError with a hint."""
    from huggingface_hub import constants, errors

    endpoint = constants.ENDPOINT
    page = f"{endpoint}/{label[len('hf://'):].split('@')[0]}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.GatedRepoError):
        return CheckpointError(
            f"{label} is gated: its files need an accepted licence and a token",
            hint=f"accept its terms at {page}, then set HF_TOKEN (or run `hf auth login`)",
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        return CheckpointError(
            f"{label}: no such model repository on the hub ({endpoint})",
            hint="check the id; a private repository also needs HF_TOKEN (or `hf auth login`)",
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return CheckpointError(
            f"{label}: the repository has no such revision", hint="a revision is a branch, a tag or a full commit sha",
        )
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return CheckpointError(f"{label}: the repository has no file {what} at the pinned commit")
    if isinstance(e, errors.LocalEntryNotFoundError) and offline():
        return CheckpointError(f"{label}: {what} is not in the local hub cache, and HF_HUB_OFFLINE is set", hint=OFFLINE_HINT)
    if unreachable(e) or isinstance(e, errors.LocalEntryNotFoundError):
        return CheckpointError(
            f"{label}: cannot reach the hub at {endpoint} for {what} ({_first_line(e)})",
            hint="check your connection (and HF_ENDPOINT); with HF_HUB_OFFLINE=1, mgc uses only the local hub cache",
        )
    if status == 401 or status == 403:
        return CheckpointError(
            f"{label}: the hub refused access to {what} (HTTP {status})", hint="set HF_TOKEN to a token with access",
        )
    if isinstance(e, errors.HfHubHTTPError) and status is not None:
        return CheckpointError(
            f"{label}: the hub answered HTTP {status} for {what}",
            hint="the hub may be down or rate-limiting: try again later",
        )
    if isinstance(e, errors.HFValidationError):
        return CheckpointError(f"{label} is not a valid hub id: {_first_line(e)}", hint="a hub id is hf://org/name")
    if isinstance(e, OSError):
        return CheckpointError(f"{label}: cannot fetch {what}: {getattr(e, 'strerror', None) or _first_line(e)}")
    return CheckpointError(
        f"{label}: the hub could not provide {what}: {type(e).__name__}: {_first_line(e)}",
        hint=f"is HF_ENDPOINT ({endpoint}) a Hugging Face hub?",
    )


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _storage(repo_id: str) -> Path:
    """The hub cache's folder for a model repository, as hf_hub_download computes it."""
    h = hf()
    from huggingface_hub.file_download import repo_folder_name

    return Path(h.constants.HF_HUB_CACHE).expanduser().resolve() / repo_folder_name(repo_id=repo_id, repo_type="model")


def _plain_revision(revision: str) -> bool:
    """A revision that names a file under refs/ without leaving it."""
    return all(part not in ("", ".", "..") for part in revision.split("/"))


def _remember(storage: Path, revision: str, sha: str) -> None:
    """refs/<revision> in the hub cache, as huggingface_hub writes it, so that offline runs find the commit."""
    if not _plain_revision(revision):
        return
    ref = storage / "refs" / revision
    try:
        if not ref.is_file() or ref.read_text() != sha:
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(sha)
    except OSError:
        pass  # a read-only cache only costs offline runs the shortcut


def _cached(repo_id: str, asked: str, storage: Path) -> Optional[Revision]:
    """The revision as the hub cache knows it (refs/ and snapshots/), or None."""
    sha = asked
    if not SHA.fullmatch(asked):
        if not _plain_revision(asked):
            return None
        try:
            sha = (storage / "refs" / asked).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
    snapshot = storage / "snapshots" / sha
    if not SHA.fullmatch(sha) or not snapshot.is_dir():
        return None
    files = frozenset(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return Revision(repo_id, asked, sha, files, snapshot, offline=True)


def _total(content_range: Optional[str]) -> Optional[int]:
    """SIZE of a Content-Range 'bytes A-B/SIZE' or 'bytes */SIZE'."""
    return _int((content_range or "").rpartition("/")[2])


def _first(content_range: Optional[str]) -> Optional[int]:
    return _int((content_range or "").partition(" ")[2].partition("-")[0])


def _int(text: Optional[str]) -> Optional[int]:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None
