"""What a run puts beside its output target, and the owner record that says whose it is.

Beside a target `NAME`, a run (process PID) makes:

    .NAME.mgc-owner-PID   a small JSON file: host, boot id, pid namespace, pid and start time of the run
    .NAME.mgc-tmp-PID     the staging folder, the output being written
    .NAME.mgc-old-PID     the old output, moved aside by a --force replacement where the two folders
                          cannot be exchanged atomically

The owner file is made first and removed last, so whatever a killed run leaves is identifiable.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import threading
from pathlib import Path
from typing import Optional

OWNER, STAGING, OLD = "owner", "tmp", "old"
HEARTBEAT = 60.0  # seconds between touches of a running run's owner file
SILENT_AFTER = 600.0  # a run on another host whose owner file is older than this is taken for dead
ASIDE = re.compile(r"\.(?P<stem>.+)\.mgc-(?P<kind>owner|tmp|old)-(?P<pid>\d+)", re.DOTALL)


def aside(target: Path, kind: str, pid: int) -> Path:
    """The path of a folder or file beside `target` that a run makes (see the module's docstring). A long name is
    shortened, with a hash of the whole name, to leave room for the suffix within the 255 bytes of a name."""
    stem = target.name
    raw = os.fsencode(stem)
    if len(raw) > 200:
        stem = os.fsdecode(raw[:160]) + "~" + hashlib.sha256(raw).hexdigest()[:16]
    return target.parent / f".{stem}.mgc-{kind}-{pid}"


@functools.lru_cache(maxsize=1)
def host() -> dict:
    """This machine: its name, boot id and pid namespace (a container may share the name but not the pids)."""
    found = {"host": socket.gethostname(), "boot": None, "pidns": None}
    try:
        found["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
        found["pidns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return found


def identity(pid: int) -> dict:
    """Who process `pid` is: host, boot id, pid namespace, pid and start time (None where unknown)."""
    return {**host(), "pid": pid, "start": start_time(pid) or None}


def start_time(pid: int) -> Optional[str]:
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


def unlink_quietly(path: Optional[Path]) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


class Heartbeat:
    """Touches owner files every HEARTBEAT seconds while a run writes, so that a run on another host sharing the
    folder can tell a live run from one whose machine went away (runtime/stale.py)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mgc-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(HEARTBEAT):
            for p in self.paths:
                try:
                    os.utime(p)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
