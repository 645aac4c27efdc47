"""Checkpoint paths: shown in messages, looked at and resolved, with every OS error a CheckpointError naming
the path."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional

from mgc.core.errors import CheckpointError, Span


def cache_root() -> Path:
    """mgc's cache folder (Fisher tensors, moe() routers, the grammar's parser): ``$MGC_CACHE``, or ``~/.cache/mgc``."""
    return Path(os.environ.get("MGC_CACHE") or "~/.cache/mgc").expanduser().resolve()


def show_path(path: str | os.PathLike, limit: int = 200) -> str:
    """A path for a message: NUL bytes made visible, an over-long one shortened in the middle."""
    text = os.fsdecode(path).replace("\0", "\\0")
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def relative_to_cwd(path: Path) -> str:
    """A path as a message shows it: relative to the working folder when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def recipe_folder(name: str | os.PathLike) -> Path:
    """The folder a recipe's relative paths (models, data, outputs) are resolved against: the folder of the file
    it was read from, as named (a symlink to a recipe is not followed). A recipe given as text resolves against
    the folder of the name it is given under; a bare name such as "<recipe>" lies in the working folder."""
    return Path(os.path.abspath(os.fsdecode(name))).parent


def stat_path(path: Path, span: Optional[Span]) -> Optional[os.stat_result]:
    """os.stat(path), following links; None where nothing is there. A path that cannot name a file (a NUL
    byte, a name too long, a symlink loop) or cannot be looked at is a CheckpointError naming it."""
    if "\0" in os.fsdecode(path):
        raise CheckpointError(f"the checkpoint path '{show_path(path)}' contains a NUL byte", span)
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(
                f"the checkpoint path '{show_path(path)}' is a symlink loop", span,
                "a symbolic link on this path points, directly or through others, back at itself",
            ) from None
        if e.errno == errno.ENAMETOOLONG:
            raise CheckpointError(f"the checkpoint path '{show_path(path)}' is too long for the file system", span) from None
        raise CheckpointError(f"cannot access the checkpoint path '{show_path(path)}': {e.strerror or e}", span) from None
    except ValueError as e:  # a path the OS cannot represent
        raise CheckpointError(f"the checkpoint path '{show_path(path)}' is not a valid path: {e}", span) from None


def resolve_checkpoint_path(text: str, base_dir: str | os.PathLike, span: Optional[Span] = None) -> Path:
    """The absolute, symlink-free path that `model("text")` names: `text`, with ~ expanded, relative to
    `base_dir`. Raises only CheckpointError, located at `span`: for a NUL byte, a name too long for the file
    system, a symlink loop, or a path that cannot be looked at (no permission). A path where nothing is is
    returned all the same (resolved as far as it exists), for the caller to fetch or report."""
    if "\0" in text:
        raise CheckpointError(f"the checkpoint path '{show_path(text)}' contains a NUL byte", span)
    path = Path(base_dir) / os.path.expanduser(text)
    stat_path(path, span)
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: Python < 3.13's "Symlink loop"
        raise CheckpointError(f"cannot resolve the checkpoint path '{show_path(path)}': {e}", span) from None


def regular_file_size(file: Path) -> int:
    """The size of `file`, which must be a regular file: a FIFO or a device would block or never end."""
    try:
        st = os.stat(file)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{file}: not a regular file")
    return st.st_size
