"""Leftovers of earlier runs beside an output target (see runtime/aside.py for what a run leaves).

A later run writing into the same folder removes the leftovers of runs that are no longer alive on this host
(and puts back an old output that an interrupted replacement had moved aside), and leaves those of live runs and
other hosts alone, saying how to remove them.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Collection, Optional

from .aside import ASIDE, OLD, OWNER, SILENT_AFTER, STAGING, host, identity, start_time, unlink_quietly


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def quoted(paths) -> str:
    """Paths as shell words, for an `rm -rf` line in a note."""
    return " ".join(shlex.quote(str(p)) for p in paths)


_reported: set[tuple[str, str]] = set()  # (folder, entry) already noted as left alone: say it once per process


def clean_stale(target: Path, note: Callable[[str], None] = note, resume: Optional[Callable[[Path, Path], bool]] = None,
                spare: Collection[Path] = ()) -> dict[Path, tuple[Path, Path]]:
    """Remove what runs that are no longer alive on this host left beside `target` (any output in its parent
    folder): staging folders, and old outputs moved aside, which are put back where their target is missing.
    Leftovers of live runs, of other hosts, or without an owner file are left alone, with a note saying how to
    remove them. Never raises: what cannot be cleaned is noted.

    `resume(target, staging folder)` says whether a dead run's staging folder of a target in this folder is to be
    continued (runtime/resume.py); those it accepts (one per target) are left in place and returned, {target:
    (staging folder, owner file)}. The staging folders in `spare` (kept by an earlier call) are left alone. A run
    on another host counts as dead for this once its owner file has had no heartbeat for SILENT_AFTER seconds."""
    parent = target.parent
    kept: dict[Path, tuple[Path, Path]] = {}
    try:
        names = os.listdir(parent)
    except OSError:
        return kept
    groups: dict[tuple[str, int], dict[str, Path]] = {}
    for name in names:
        m = ASIDE.fullmatch(name)
        if m:
            groups.setdefault((m["stem"], int(m["pid"])), {})[m["kind"]] = parent / name
    for (stem, pid), entries in sorted(groups.items()):
        owner = _read_owner(entries.get(OWNER))
        state = _state(owner, pid) if owner is not None else None
        if state == "ours" or entries.get(STAGING) in spare:
            continue
        folders = [entries[k] for k in (STAGING, OLD) if k in entries]
        if state == "dead" or (state == "foreign" and _silent(entries[OWNER])):
            staging, name = entries.get(STAGING), owner.get("target")
            if (resume is not None and staging is not None and OLD not in entries and _plain(name)
                    and parent / name not in kept and resume(parent / name, staging)):
                kept[parent / name] = (staging, entries[OWNER])
                continue
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
            where = f"on host {owner.get('host')!r}" if owner.get("host") != host()["host"] else "in another container"
            why = f"mgc process {pid} {where} made {it}; once that run is over, remove {it}"
        else:
            why = f"there is no record of the mgc run that made {it}; if no mgc run is writing {it}, remove {it}"
        note(f"left {_names(folders)} in '{parent}' alone: {why} with: rm -rf {quoted(entries.values())}")
    return kept


def _clean_dead(parent: Path, stem: str, pid: int, owner: dict, entries: dict[str, Path], note) -> None:
    done = []
    try:
        old, staging = entries.get(OLD), entries.get(STAGING)
        name = owner.get("target")
        target = parent / (name if _plain(name) else stem)
        keep_owner = False
        if old is not None and not os.path.lexists(target):
            os.rename(old, target)
            done.append(f"put back '{target}', which an interrupted --force replacement had moved aside")
        elif old is not None and staging is not None:
            # The new output never reached the target, yet something is there now: not ours to judge. The owner
            # file stays, so that this is said again, and the old output put back once the target is gone.
            note(f"left '{old.name}' in '{parent}' alone: it is what '{target.name}' held before an interrupted "
                 f"--force replacement; move it back, or remove it with: rm -rf {quoted([old])}")
            old, keep_owner = None, True
        removed = [p for p in (staging, old) if p is not None and os.path.lexists(p)]
        for p in removed:
            _remove(p)
        if removed:
            done.append(f"removed {_names(removed)} in '{parent}'")
        if not keep_owner:
            unlink_quietly(entries.get(OWNER))
    except OSError as e:
        note(f"could not clean up after mgc process {pid} (no longer running) in '{parent}': {e.strerror or e}; "
             f"remove its leftovers with: rm -rf {quoted(p for p in entries.values() if os.path.lexists(p))}")
        return
    if done:
        note(f"{'; '.join(done)}: left by mgc process {pid}, which is no longer running")


def _silent(owner: Path) -> bool:
    """Whether a run's owner file has not been touched (aside.Heartbeat) for SILENT_AFTER seconds, by the clock of
    the file system that holds it (a file made beside it now), not this host's, which may be set otherwise."""
    try:
        touched = os.stat(owner).st_mtime
        fd, probe = tempfile.mkstemp(prefix=".mgc-clock-", dir=owner.parent)
        try:
            now = os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.unlink(probe)
        return now - touched > SILENT_AFTER
    except OSError:
        return False


def _plain(name) -> bool:
    """Whether an owner record's target is a plain name in its folder."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _names(paths) -> str:
    return ", ".join(f"'{p.name}'" for p in paths)


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
    me = identity(os.getpid())
    if owner.get("pid") != pid:
        return None
    if owner.get("host") != me["host"] or owner.get("pidns", me["pidns"]) != me["pidns"]:
        return "foreign"
    if owner.get("boot") and me["boot"] and owner["boot"] != me["boot"]:
        return "dead"  # made before the last reboot
    if pid == os.getpid():
        return "ours" if owner.get("start") == me["start"] else "dead"
    start = start_time(pid)
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


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
