"""Where outputs may go: never over what a run reads, nor over one another.

A save replaces its whole folder (with --force, whatever was there), so an output folder that is,
contains or lies inside an input checkpoint, the recipe, a Fisher cache or data file, or that is or
contains the working folder, is refused before anything runs; so is a save inside another save's
folder. Paths are compared as real paths, symlinks followed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from mgc.core.errors import MgcErrors, OutputError

Inputs = Union[Mapping[Path, str], Iterable[Path]]


def check_output_paths(saves, inputs: Inputs, recipe: Optional[Path], cwd: Path) -> None:
    """Raise OutputError (MgcErrors for several) at each save whose folder overlaps `inputs` (paths, or
    {path: what it is}), is or contains `recipe` or `cwd`, or overlaps an earlier save's folder."""
    described = dict(inputs) if isinstance(inputs, Mapping) else {p: "the input" for p in inputs}
    if recipe is not None:
        described.setdefault(Path(recipe), "the recipe")
    read = [(_real(p), what) for p, what in described.items()]
    here = _real(cwd)
    errors: list[OutputError] = []
    placed: list[tuple[Path, object]] = []
    for save in saves:
        out = _real(save.path)
        error = _against_cwd(out, save, here) or _against_inputs(out, save, read) or _against_saves(out, save, placed)
        if error is not None:
            errors.append(error)
        placed.append((out, save))
    if errors:
        raise errors[0] if len(errors) == 1 else MgcErrors(errors)


def program_inputs(program) -> dict[Path, str]:
    """Everything a checked program reads, by what it is: checkpoint folders and their weight files (which
    may lie elsewhere, as the hub cache's symlinks do), Fisher cache folders and the Fisher data files."""
    found: dict[Path, str] = {}
    for path, ckpt in program.checkpoints.items():
        # an adapter is keyed by its weights file; its whole folder is an input
        found.setdefault(Path(getattr(ckpt, "folder", path)), getattr(ckpt, "what", "the input checkpoint"))
        for f in getattr(ckpt, "files", ()):
            found.setdefault(Path(f), "a file of the input checkpoint")
    for cache, fm in getattr(program, "fishers", {}).items():
        found.setdefault(Path(cache), "the Fisher cache folder")
        found.setdefault(Path(fm.data), "the Fisher data file")
    for cache, gate in getattr(program, "gates", {}).items():
        found.setdefault(Path(cache), "the moe() gate cache folder")
        for f in gate.files:
            found.setdefault(Path(f), "a moe() prompt file")
    return found


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def overlaps(a: Path, b: Path) -> bool:
    """Whether folder `a` is, contains or lies inside `b`, as real paths (symlinks followed)."""
    a, b = _real(a), _real(b)
    return _inside(a, b) or _inside(b, a)


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies under it."""
    return a == b or b in a.parents


def _against_inputs(out: Path, save, read) -> Optional[OutputError]:
    for path, what in read:
        if out == path:
            where = f"is {what} '{path}'"
        elif _inside(path, out):
            where = f"contains {what} '{path}'"
        elif _inside(out, path):
            where = f"lies inside {what} '{path}'"
        else:
            continue
        return OutputError(
            f"output folder '{out}' {where}", save.span,
            "mgc never writes where it reads: choose an output folder apart from the inputs and the recipe",
        )
    return None


def _against_cwd(out: Path, save, cwd: Path) -> Optional[OutputError]:
    if not _inside(cwd, out):
        return None
    where = "is the working folder" if out == cwd else f"contains the working folder '{cwd}'"
    return OutputError(
        f"output folder '{out}' {where}", save.span,
        'an output folder is replaced as a whole: write into a new folder, e.g. "out/merged"',
    )


def _against_saves(out: Path, save, placed) -> Optional[OutputError]:
    for other_path, other in placed:
        if out == other_path:
            where = "is also"
        elif _inside(out, other_path):
            where = "lies inside"
        elif _inside(other_path, out):
            where = "contains"
        else:
            continue
        return OutputError(
            f"output folder '{out}' {where} the output folder '{other_path}' of another save", save.span,
            f"the other save is at {other.span}; each output folder is replaced as a whole, so give each save "
            "its own folder, side by side",
        )
    return None
