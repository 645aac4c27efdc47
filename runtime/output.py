"""Output folders appear whole or not at all: everything is written into a temporary
folder beside the target, which replaces the target only once complete."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from mgc.compiler.errors import OutputError, Span

CONFIG_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
EXTRA_FILES = ("generation_config.json",)


def check_target(path: Path, force: bool, span: Optional[Span] = None) -> None:
    if path.exists() and not path.is_dir():
        raise OutputError(f"output '{path}' exists and is not a folder", span)
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputError(f"output folder '{path}' exists and is not empty", span, "pass --force to replace it")


class StagedOutput:
    """A temporary folder that becomes `target` on commit() and vanishes on abort()."""

    def __init__(self, target: Path):
        self.target = target
        self.created: list[Path] = []  # parent folders this output made, innermost first
        p = target.parent
        while not p.exists():
            self.created.append(p)
            p = p.parent
        target.parent.mkdir(parents=True, exist_ok=True)
        self.folder = target.parent / f".{target.name}.mgc-tmp-{os.getpid()}"
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir()

    def write_config(self, config: dict, dtype: Optional[torch.dtype]) -> None:
        config = dict(config)
        if dtype in CONFIG_DTYPE_NAMES:
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = CONFIG_DTYPE_NAMES[dtype]
        (self.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def copy_files(self, files) -> None:
        for f in files:
            shutil.copy2(f, self.folder / Path(f).name)

    def commit(self) -> None:
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.mgc-old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.folder, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        for p in self.created:
            try:
                p.rmdir()  # only if empty
            except OSError:
                break
