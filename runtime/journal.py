"""The resume journal: which tensors of a staged output are on disk, so that a run started again after a crash
writes only the rest (docs/distributed.md).

A staging folder being written holds JOURNAL_DIR with one append-only file per process (per rank under torchrun).
Its first line is the run key (runtime/resume.py); each further line names a finished tensor: its shard file,
offset, length and the crc32 of its bytes. A line is appended only after the shard file's bytes for it were
fsync'd, and the lines are fsync'd in groups (every FLUSH_BYTES of tensor data or FLUSH_SECONDS), so durability
costs a sync per group, not per tensor, and is done on a thread of its own. A torn last line does not parse and is ignored; an entry whose bytes no
longer match its crc32 is recomputed.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import secrets
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mgc.core.errors import MergeRuntimeError

JOURNAL_DIR = ".mgc-journal"
FLUSH_BYTES = 256 << 20
FLUSH_SECONDS = 10.0
READ_BLOCK = 16 << 20
_written = itertools.count(1)  # tensors this process wrote, for fault_hook


@dataclass(frozen=True)
class Entry:
    tensor: str
    file: str
    offset: int
    length: int
    crc: int


def flush_bytes() -> int:
    """FLUSH_BYTES, or MGC_JOURNAL_BYTES where set (tests journal every tensor with 0)."""
    raw = os.environ.get("MGC_JOURNAL_BYTES")
    return int(raw) if raw and raw.isdigit() else FLUSH_BYTES


class Journal:
    """One process's journal in a staging folder. `wrote()` records a tensor whose bytes were written to `f`
    (an open shard file). Every FLUSH_BYTES (or FLUSH_SECONDS) the group is handed to a thread that fsyncs the
    shard files, then appends and fsyncs its lines, so that the writer never waits for the disk. With
    MGC_JOURNAL_BYTES=0 every tensor is journaled before wrote() returns."""

    def __init__(self, folder: Path, key: str, rank: int = 0):
        d = folder / JOURNAL_DIR
        d.mkdir(exist_ok=True)
        self.path = d / f"rank{rank:05d}-{secrets.token_hex(4)}.jsonl"
        self.f = open(self.path, "x", encoding="utf-8")
        # synced with the first group's lines, not here: a key line lost to a crash only means starting afresh,
        # and an fsync now would wait for the file system's journal (a fifth of a second on ext4) on every run
        self.f.write(json.dumps({"key": key}) + "\n")
        self.f.flush()
        self.pending: list[Entry] = []
        self.dirty: dict[str, object] = {}  # shard file name -> open file with unsynced tensor bytes
        self.bytes = 0
        self.every = flush_bytes()
        self.last = time.monotonic()
        self.groups: queue.Queue = queue.Queue()
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None

    def wrote(self, entry: Entry, f) -> None:
        self.pending.append(entry)
        self.dirty[entry.file] = f
        self.bytes += entry.length
        if self.bytes >= self.every or time.monotonic() - self.last >= FLUSH_SECONDS:
            self._hand_off()
            if self.every == 0:
                self._wait()
        fault_hook("tensor", next(_written))

    def _hand_off(self) -> None:
        if self.error is not None:
            raise self.error
        if self.pending:
            for f in self.dirty.values():
                f.flush()  # into the kernel, here on the writer's thread; the sync thread only fsyncs
            if self.thread is None:
                self.thread = threading.Thread(target=self._sync, name="mgc-journal", daemon=True)
                self.thread.start()
            self.groups.put((self.pending, [f.fileno() for f in self.dirty.values()]))
        self.pending, self.dirty, self.bytes, self.last = [], {}, 0, time.monotonic()

    def _sync(self) -> None:
        while True:
            group = self.groups.get()
            try:
                if group is not None and self.error is None:
                    entries, fds = group
                    for fd in fds:
                        os.fsync(fd)
                    self.f.write("".join(json.dumps(e.__dict__, separators=(",", ":")) + "\n" for e in entries))
                    self.f.flush()
                    os.fsync(self.f.fileno())
            except BaseException as e:  # raised on the writer's thread, at its next group or at close()
                self.error = e
            finally:
                self.groups.task_done()
            if group is None:
                return

    def _wait(self) -> None:
        self.groups.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop journaling: the group being synced is finished, those waiting are dropped (their tensors are
        written; a run resumed after a kill between here and the commit writes them again). So the end of a run
        never waits for the disk to catch up, as it did not before there was a journal."""
        if self.f.closed:
            return
        self.pending = []
        if self.thread is not None:
            try:
                while True:
                    self.groups.get_nowait()
                    self.groups.task_done()
            except queue.Empty:
                pass
            self.groups.put(None)
            self.thread.join()
            self.thread = None
        self.f.close()
        if self.error is not None:
            raise self.error


def read_key(folder: Path) -> Optional[str]:
    """The run key of the journals in a staging folder: None where there is none, or they disagree."""
    keys = {lines[0].get("key") for lines in _journals(folder)}
    return keys.pop() if len(keys) == 1 else None


def read_entries(folder: Path) -> list[Entry]:
    """Every well-formed entry of the folder's journals, one per tensor (the last written), in a fixed order."""
    found: dict[str, Entry] = {}
    for lines in _journals(folder):
        for line in lines[1:]:
            try:
                e = Entry(str(line["tensor"]), str(line["file"]), int(line["offset"]), int(line["length"]), int(line["crc"]))
            except (KeyError, TypeError, ValueError):
                continue
            found[e.tensor] = e
    return [found[k] for k in sorted(found)]


def _journals(folder: Path) -> list[list[dict]]:
    d = folder / JOURNAL_DIR
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    out = []
    for name in names:
        try:
            text = (d / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = []
        for raw in text.split("\n")[:-1]:  # the part after the last newline is a torn line
            try:
                value = json.loads(raw)
            except ValueError:
                break
            if not isinstance(value, dict):
                break
            lines.append(value)
        if lines and isinstance(lines[0].get("key"), str):
            out.append(lines)
    return out


def verify(folder: Path, entry: Entry, slots: dict) -> bool:
    """Whether the entry names the tensor's slot in this layout and its bytes on disk match the crc32."""
    slot = slots.get(entry.tensor)
    if slot is None or (slot.file, slot.begin, slot.end - slot.begin) != (entry.file, entry.offset, entry.length):
        return False
    crc, left = 0, entry.length
    try:
        with open(folder / entry.file, "rb") as f:
            f.seek(entry.offset)
            while left:
                block = f.read(min(left, READ_BLOCK))
                if not block:
                    return False
                crc = zlib.crc32(block, crc)
                left -= len(block)
    except OSError:
        return False
    return crc == entry.crc


def fault_hook(stage: str, count: int = 0) -> None:
    """For the tests of resuming (tests/test_resume.py): MGC_TEST_KILL_AFTER=k kills this process with SIGKILL
    (or MGC_TEST_SIGNAL, e.g. SIGTERM) after the k-th tensor it wrote, MGC_TEST_FAIL_AFTER=k raises an error there
    instead, MGC_TEST_KILL_AT=STAGE kills it at a stage of the commit ("commit": before the journal is removed,
    "move": after, before the rename into place); MGC_TEST_RANK limits them to one rank."""
    env = os.environ
    if not any(k in env for k in ("MGC_TEST_KILL_AFTER", "MGC_TEST_FAIL_AFTER", "MGC_TEST_KILL_AT")):
        return
    if env.get("MGC_TEST_RANK", env.get("RANK", "0")) != env.get("RANK", "0"):
        return
    if stage == "tensor" and env.get("MGC_TEST_KILL_AFTER") == str(count):
        os.kill(os.getpid(), getattr(signal, env.get("MGC_TEST_SIGNAL", "SIGKILL")))
    if stage == "tensor" and env.get("MGC_TEST_FAIL_AFTER") == str(count):
        raise MergeRuntimeError(f"test failure after {count} tensors (MGC_TEST_FAIL_AFTER)")
    if env.get("MGC_TEST_KILL_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)
