"""Output folders appear whole or not at all: everything is written into a temporary
folder beside the target, which replaces the target only once complete.

Beside a target `NAME`, a run (process PID) makes:

    .NAME.mgc-owner-PID   a small JSON file: host, boot id, pid namespace, pid and start time of the run
    .NAME.mgc-tmp-PID     the staging folder, the output being written
    .NAME.mgc-old-PID     the old output, moved aside by a --force replacement where the two folders
                          cannot be exchanged atomically

The owner file is made first and removed last, so whatever a killed run leaves is identifiable: a later
run writing into the same folder removes the leftovers of runs that are no longer alive on this host
(and puts back an old output that an interrupted replacement had moved aside), and leaves those of live
runs and other hosts alone, saying how to remove them.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mgc.core.errors import OutputError, Span

from .writer import ShardedWriter

CONFIG_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
EXTRA_FILES = ("generation_config.json",)
OWNER, STAGING, OLD = "owner", "tmp", "old"
_ASIDE = re.compile(r"\.(?P<stem>.+)\.mgc-(?P<kind>owner|tmp|old)-(?P<pid>\d+)", re.DOTALL)
_HINTS = {
    errno.ENOSPC: "the disk is full: free some space, or write the output to another disk",
    errno.EDQUOT: "the disk quota is used up: free some space, or write the output elsewhere",
    errno.EACCES: "choose an output folder you may write to",
    errno.EPERM: "choose an output folder you may write to",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.ENAMETOOLONG: "choose a shorter output folder name",
}


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


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
        if name == target or any(_ASIDE.fullmatch(part) for part in name.parts):
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


class StagedOutput:
    """A temporary folder that becomes `target` on commit() and vanishes on abort(). It is made by open(), so
    that a caller can hold the object, and abort() it, before anything is on disk."""

    def __init__(self, target: Path, span: Optional[Span] = None):
        self.target = target
        self.span = span
        self.created: list[Path] = []  # parent folders this output made, innermost first
        self.owner, self.folder, self.old = (_aside(target, kind, os.getpid()) for kind in (OWNER, STAGING, OLD))

    def open(self) -> "StagedOutput":
        try:
            p = self.target.parent
            while not p.exists():
                self.created.append(p)
                p = p.parent
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if self.folder.exists():  # this process's own, from an earlier run that failed to clean up
                shutil.rmtree(self.folder)
            record = {**_identity(os.getpid()), "target": self.target.name, "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self.owner.write_text(json.dumps(record) + "\n")
            self.folder.mkdir()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise self.error(e) from None
            raise
        return self

    def error(self, e: OSError) -> OutputError:
        return output_error(self.target, e, self.span)

    def writer(self, tensors, shard_bytes: int) -> "StagedWriter":
        return StagedWriter(self, tensors, shard_bytes)

    def write_config(self, config: dict, dtype: Optional[torch.dtype]) -> None:
        config = dict(config)
        if dtype in CONFIG_DTYPE_NAMES:
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = CONFIG_DTYPE_NAMES[dtype]
        try:
            (self.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        except OSError as e:
            raise self.error(e) from None

    def copy_files(self, files) -> None:
        try:
            for f in files:
                shutil.copy2(f, self.folder / Path(f).name)
        except OSError as e:
            raise self.error(e) from None

    def commit(self) -> None:
        """Move the staged folder to the target. A target already there (check_target allowed it: empty, or
        --force) is exchanged with it in one step where the system can, so that the target path always holds
        the old output or the new one; elsewhere the old is renamed aside first, and put back if the second
        rename fails (or, after a crash between the two, by the next run's clean_stale)."""
        try:
            replaced = self._move_in()
        except BaseException as e:
            if os.path.lexists(self.old):  # interrupted between the two renames, or just after them
                if not os.path.lexists(self.target):
                    try:
                        os.rename(self.old, self.target)
                    except OSError:
                        pass  # it waits aside, with the owner file, for clean_stale
                elif not os.path.lexists(self.folder):
                    shutil.rmtree(self.old, ignore_errors=True)
            self.abort()
            if isinstance(e, OSError):
                raise self.error(e) from None
            raise
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)  # if interrupted, clean_stale finishes it later
            if os.path.lexists(replaced):
                _note(f"could not delete all of the output that '{self.target}' replaced; remove it with: "
                      f"rm -rf {_quoted([replaced])}")
                return  # the owner file stays, so that a later run tries again
        _unlink(self.owner)

    def _move_in(self) -> Optional[Path]:
        """Put the staged folder at the target; return where the replaced output now is, if there was one."""
        if not os.path.lexists(self.target):
            os.rename(self.folder, self.target)
            return None
        if _exchange(self.folder, self.target):
            return self.folder
        os.rename(self.target, self.old)
        os.rename(self.folder, self.target)
        return self.old

    def abort(self) -> None:
        """Remove the staged folder (and, once nothing else of this output is aside, the owner file). Safe to call
        at any point, also after commit()."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if not os.path.lexists(self.folder) and not os.path.lexists(self.old):
            _unlink(self.owner)
        for p in self.created:
            try:
                p.rmdir()  # only if empty
            except OSError:
                break


class StagedWriter(ShardedWriter):
    """A ShardedWriter into a StagedOutput, whose OS errors are OutputErrors naming the output folder."""

    def __init__(self, output: StagedOutput, tensors, shard_bytes: int):
        self.output = output
        self.files = {}
        try:
            super().__init__(output.folder, tensors, shard_bytes)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise output.error(e) from None
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            super().write(name, tensor)
        except OSError as e:
            raise self.output.error(e) from None

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:
            raise self.output.error(e) from None


# ---------------------------------------------------------------- leftovers of earlier runs

_reported: set[tuple[str, str]] = set()  # (folder, entry) already noted as left alone: say it once per process


def clean_stale(target: Path, note: Callable[[str], None] = _note) -> None:
    """Remove what runs that are no longer alive on this host left beside `target` (any output in its parent
    folder): staging folders, and old outputs moved aside, which are put back where their target is missing.
    Leftovers of live runs, of other hosts, or without an owner file are left alone, with a note saying how to
    remove them. Never raises: what cannot be cleaned is noted."""
    parent = target.parent
    try:
        names = os.listdir(parent)
    except OSError:
        return
    groups: dict[tuple[str, int], dict[str, Path]] = {}
    for name in names:
        m = _ASIDE.fullmatch(name)
        if m:
            groups.setdefault((m["stem"], int(m["pid"])), {})[m["kind"]] = parent / name
    for (stem, pid), entries in sorted(groups.items()):
        owner = _read_owner(entries.get(OWNER))
        state = _state(owner, pid) if owner is not None else None
        if state == "ours":
            continue
        folders = [entries[k] for k in (STAGING, OLD) if k in entries]
        if state == "dead":
            _clean_dead(parent, stem, pid, owner, entries, note)
            continue
        if not folders:
            continue  # an owner file alone: a run that is starting, or an unreadable record; nothing big
        key = (str(parent), "\0".join(sorted(str(p) for p in entries.values())))
        if key in _reported:
            continue
        _reported.add(key)
        it = "it" if len(folders) == 1 else "them"
        if state == "alive":
            why = f"mgc process {pid} is still running on this host; if it is not an mgc run any more, remove {it}"
        elif state == "foreign":
            where = f"on host {owner.get('host')!r}" if owner.get("host") != _host()["host"] else "in another container"
            why = f"mgc process {pid} {where} made {it}; once that run is over, remove {it}"
        else:
            why = f"there is no record of the mgc run that made {it}; if no mgc run is writing {it}, remove {it}"
        note(f"left {_names(folders)} in '{parent}' alone: {why} with: rm -rf {_quoted(entries.values())}")


def _clean_dead(parent: Path, stem: str, pid: int, owner: dict, entries: dict[str, Path], note) -> None:
    done = []
    try:
        old, staging = entries.get(OLD), entries.get(STAGING)
        name = owner.get("target")
        target = parent / (name if isinstance(name, str) and name not in ("", ".", "..") and "/" not in name else stem)
        keep_owner = False
        if old is not None and not os.path.lexists(target):
            os.rename(old, target)
            done.append(f"put back '{target}', which an interrupted --force replacement had moved aside")
        elif old is not None and staging is not None:
            # The new output never reached the target, yet something is there now: not ours to judge. The owner
            # file stays, so that this is said again, and the old output put back once the target is gone.
            note(f"left '{old.name}' in '{parent}' alone: it is what '{target.name}' held before an interrupted "
                 f"--force replacement; move it back, or remove it with: rm -rf {_quoted([old])}")
            old, keep_owner = None, True
        removed = [p for p in (staging, old) if p is not None and os.path.lexists(p)]
        for p in removed:
            _remove(p)
        if removed:
            done.append(f"removed {_names(removed)} in '{parent}'")
        if not keep_owner:
            _unlink(entries.get(OWNER))
    except OSError as e:
        note(f"could not clean up after mgc process {pid} (no longer running) in '{parent}': {e.strerror or e}; "
             f"remove its leftovers with: rm -rf {_quoted(p for p in entries.values() if os.path.lexists(p))}")
        return
    if done:
        note(f"{'; '.join(done)}: left by mgc process {pid}, which is no longer running")


def _names(paths) -> str:
    return ", ".join(f"'{p.name}'" for p in paths)


def _quoted(paths) -> str:
    return " ".join(shlex.quote(str(p)) for p in paths)


def _read_owner(path: Optional[Path]) -> Optional[dict]:
    if path is None:
        return None
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _state(owner: dict, pid: int) -> Optional[str]:
    """'ours' (this process), 'alive', 'dead' (on this host), 'foreign' (made on another host), or None for a
    record that does not match its name."""
    me = _identity(os.getpid())
    if owner.get("pid") != pid:
        return None
    if owner.get("host") != me["host"] or owner.get("pidns", me["pidns"]) != me["pidns"]:
        return "foreign"
    if owner.get("boot") and me["boot"] and owner["boot"] != me["boot"]:
        return "dead"  # made before the last reboot
    if pid == os.getpid():
        return "ours" if owner.get("start") == me["start"] else "dead"
    start = _start_time(pid)
    if start is None:
        return "alive" if _pid_alive(pid) else "dead"
    # A different start time: the pid has been reused by another process since.
    return "alive" if start and owner.get("start") in (None, start) else "dead"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _host() -> dict:
    """This machine: its name, boot id and pid namespace (a container may share the name but not the pids)."""
    found = {"host": socket.gethostname(), "boot": None, "pidns": None}
    try:
        found["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
        found["pidns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return found


def _identity(pid: int) -> dict:
    """Who process `pid` is: host, boot id, pid namespace, pid and start time (None where unknown)."""
    return {**_host(), "pid": pid, "start": _start_time(pid) or None}


def _start_time(pid: int) -> Optional[str]:
    """When process `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat); "" when no such
    process runs (a zombie counts as gone), None where this cannot be read (no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "" if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    try:
        fields = raw[raw.rindex(")") + 2:].split()  # the name in parentheses may hold spaces; field 3 follows
        return "" if fields[0] in ("Z", "X") else fields[19]
    except (ValueError, IndexError):
        return None


def _aside(target: Path, kind: str, pid: int) -> Path:
    """The path of a folder or file beside `target` that a run makes (see the module's docstring). A long name is
    shortened, with a hash of the whole name, to leave room for the suffix within the 255 bytes of a name."""
    stem = target.name
    raw = os.fsencode(stem)
    if len(raw) > 200:
        stem = os.fsdecode(raw[:160]) + "~" + hashlib.sha256(raw).hexdigest()[:16]
    return target.parent / f".{stem}.mgc-{kind}-{pid}"


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _unlink(path: Optional[Path]) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


# ---------------------------------------------------------------- atomic exchange

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28 and later
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE). False where the system or the
    file system cannot, and nothing was changed."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
