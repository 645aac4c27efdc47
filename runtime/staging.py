"""Output folders appear whole or not at all: everything is written into a temporary folder beside the target
(runtime/aside.py names it), which replaces the target only once complete."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from mgc.core.dtypes import DTYPE_NAMES
from mgc.core.errors import OutputError, Span

from .aside import OLD, OWNER, STAGING, aside, identity, unlink_quietly
from .exchange import exchange
from .journal import JOURNAL_DIR, fault_hook
from .stale import note, quoted
from .target import output_error
from .writer import ShardedWriter


class StagedOutput:
    """A temporary folder that becomes `target` on commit() and vanishes on abort(). It is made by open(), so
    that a caller can hold the object, and abort() it, before anything is on disk."""

    def __init__(self, target: Path, span: Optional[Span] = None):
        self.target = target
        self.span = span
        self.created: list[Path] = []  # parent folders this output made, innermost first
        self.resumed = False  # open() continued an interrupted run's folder
        self.owner, self.folder, self.old = (aside(target, kind, os.getpid()) for kind in (OWNER, STAGING, OLD))

    def open(self, adopt: Optional[tuple[Path, Path]] = None) -> "StagedOutput":
        """Make the staging folder; or, given `adopt` (a dead run's staging folder and owner file that
        clean_stale kept for resuming), take that folder over: its shards and journal stay, the rest goes."""
        try:
            p = self.target.parent
            while not p.exists():
                self.created.append(p)
                p = p.parent
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if self.folder.exists():  # this process's own, from an earlier run that failed to clean up
                shutil.rmtree(self.folder)
            record = {**identity(os.getpid()), "target": self.target.name, "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self.owner.write_text(json.dumps(record) + "\n")
            if adopt is not None:
                self.resumed = _take_over(adopt, self.folder)
            if not self.resumed:
                self.folder.mkdir()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise self.error(e) from None
            raise
        return self

    def error(self, e: OSError) -> OutputError:
        return output_error(self.target, e, self.span)

    def writer(self, tensors, shard_bytes: int, metadata=None, first_only=None, mode: str = "create") -> "StagedWriter":
        return StagedWriter(self, tensors, shard_bytes, metadata, first_only, mode)

    def write_text(self, name: str, text: str) -> None:
        """A file of the output (the model card), unless one of that name was copied there already."""
        path = self.folder / name
        try:
            if not os.path.lexists(path):
                path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise self.error(e) from None

    def write_config(self, config: dict, dtype: Optional[torch.dtype]) -> None:
        config = dict(config)
        if dtype in DTYPE_NAMES:
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = DTYPE_NAMES[dtype]
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
            fault_hook("commit")
            if os.path.lexists(self.folder / JOURNAL_DIR):  # not part of the output
                shutil.rmtree(self.folder / JOURNAL_DIR)
            fault_hook("move")
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
                note(f"could not delete all of the output that '{self.target}' replaced; remove it with: "
                     f"rm -rf {quoted([replaced])}")
                return  # the owner file stays, so that a later run tries again
        unlink_quietly(self.owner)

    def _move_in(self) -> Optional[Path]:
        """Put the staged folder at the target; return where the replaced output now is, if there was one."""
        if not os.path.lexists(self.target):
            os.rename(self.folder, self.target)
            return None
        if exchange(self.folder, self.target):
            return self.folder
        os.rename(self.target, self.old)
        os.rename(self.folder, self.target)
        return self.old

    def abort(self) -> None:
        """Remove the staged folder (and, once nothing else of this output is aside, the owner file). Safe to call
        at any point, also after commit()."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if not os.path.lexists(self.folder) and not os.path.lexists(self.old):
            unlink_quietly(self.owner)
        for p in self.created:
            try:
                p.rmdir()  # only if empty
            except OSError:
                break


def _take_over(adopt: tuple[Path, Path], folder: Path) -> bool:
    """Rename a dead run's staging folder to ours and drop its owner file; keep only its shards and journal
    (a config or card it was writing may be torn; they are written again). False if it is gone (another run
    took it first)."""
    try:
        os.rename(adopt[0], folder)
    except FileNotFoundError:
        return False
    unlink_quietly(adopt[1])
    for name in os.listdir(folder):
        path = folder / name
        if name == JOURNAL_DIR or (name.endswith(".safetensors") and path.is_file() and not path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return True


class StagedWriter(ShardedWriter):
    """A ShardedWriter into a StagedOutput, whose OS errors are OutputErrors naming the output folder."""

    def __init__(self, output: StagedOutput, tensors, shard_bytes: int, metadata=None, first_only=None,
                 mode: str = "create"):
        self.output = output
        self.files = {}
        self.journal = None
        try:
            super().__init__(output.folder, tensors, shard_bytes, metadata, first_only, mode)
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

    def close(self, index: bool = True) -> None:
        try:
            super().close(index)
        except OSError as e:
            raise self.output.error(e) from None
