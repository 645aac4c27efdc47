"""An output target: checked before a run writes it, and the OS errors met while writing it, as OutputErrors
that name the output folder, the reason and what to do."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional

from mgc.core.errors import OutputError, Span

from .aside import ASIDE

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space, or write the output to another disk",
    errno.EDQUOT: "the disk quota is used up: free some space, or write the output elsewhere",
    errno.EACCES: "choose an output folder you may write to",
    errno.EPERM: "choose an output folder you may write to",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.ENAMETOOLONG: "choose a shorter output folder name",
}


def output_error(target: Path, e: OSError, span: Optional[Span] = None) -> OutputError:
    """An OSError met while writing `target`, as an OutputError naming the output folder and the reason. A file
    named by the error is shown too, unless it is the target or one of the run's own files beside it."""
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(target)
        if blocker is not None:
            return _blocked(target, blocker, span)
    reason = e.strerror or str(e)
    name = e.filename
    if name is not None:
        name = Path(os.fsdecode(name))
        if name == target or any(ASIDE.fullmatch(part) for part in name.parts):
            name = None
    return OutputError(
        f"cannot write output folder '{target}': {reason}" + (f": '{name}'" if name is not None else ""), span,
        _HINTS.get(e.errno),
    )


def _file_in_the_way(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of `path` when it is not a folder (nothing can be made under it)."""
    for p in path.parents:
        try:
            mode = os.stat(p).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
        return None if stat.S_ISDIR(mode) else p
    return None


def _blocked(target: Path, blocker: Path, span: Optional[Span]) -> OutputError:
    return OutputError(
        f"cannot write output folder '{target}': '{blocker}' is a file, not a folder", span,
        "choose an output folder whose parents are folders",
    )


def check_target(path: Path, force: bool, span: Optional[Span] = None) -> None:
    try:
        blocker = _file_in_the_way(path)
        if blocker is not None:
            raise _blocked(path, blocker, span)
        if path.exists() and not path.is_dir():
            raise OutputError(f"output '{path}' exists and is not a folder", span)
        if path.is_dir() and any(path.iterdir()) and not force:
            raise OutputError(f"output folder '{path}' exists and is not empty", span, "pass --force to replace it")
    except OSError as e:
        raise output_error(path, e, span) from None
