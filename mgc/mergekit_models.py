"""The models a mergekit configuration names, as `model(...)` and `lora(...)` statements: a local path
relative to the recipe, a hub id as hf://, `base+lora` as a LoRA on its base, and a variable name for each."""
from __future__ import annotations

import keyword
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mgc.mergekit_yaml import Y, refuse, string
from mgc.stdlib import OPERATORS

RESERVED = {"def", "save", "to", "with", "model", "ramp", "stack", "fisher", "lora", "moe", "layers", "union", "true",
            "false", "_", "merged"} | set(OPERATORS)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class Importer:
    config: Path
    out_dir: Path  # the folder of the recipe written (its paths are relative to it)
    root: Path  # the folder mergekit's relative model paths are read from (the working directory)
    lines: list[str] = field(default_factory=list)  # model statements
    names: dict[str, str] = field(default_factory=dict)  # model reference -> variable
    taken: set[str] = field(default_factory=set)
    merges: dict[str, str] = field(default_factory=dict)  # mergekit-multi name -> variable
    notes: list[str] = field(default_factory=list)

    def var(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", hint).strip("_").lower() or "m"
        if base[0].isdigit():
            base = "m_" + base
        if base in RESERVED or keyword.iskeyword(base):
            base = base + "_model"
        name, i = base, 2
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def path(self, ref: str) -> str:
        p = Path(os.path.expanduser(ref))
        local = p if p.is_absolute() else self.root / p
        if not local.exists() and HUB_ID.match(ref):
            return "hf://" + ref
        if p.is_absolute():
            return str(p)
        return Path(os.path.relpath(local.resolve(), self.out_dir.resolve())).as_posix()

    def local_checkpoint(self, ref: str) -> Optional[Path]:
        """The local folder a model reference names (a LoRA's base for `base+lora`), or None: a hub id, a
        mergekit-multi merge's name, a path that is not a folder."""
        ref = ref.strip()
        if ref in self.merges:
            return None
        ref = ref.split("+", 1)[0]
        p = Path(os.path.expanduser(ref))
        local = p if p.is_absolute() else self.root / p
        return local if local.is_dir() else None

    def model(self, y: Y) -> str:
        return self.ref(string(y, "a model").strip())

    def ref(self, ref: str) -> str:
        if ref in self.merges:
            return self.merges[ref]
        if ref in self.names:
            return self.names[ref]
        if "+" in ref:
            base_ref, lora_ref = ref.split("+", 1)
            base = self.ref(base_ref)
            name = self.var(Path(lora_ref.rstrip("/")).name)
            self.lines.append(f'{name} = lora("{self.path(lora_ref)}", base = {base})')
        else:
            name = self.var(Path(ref.split("@")[0].rstrip("/")).name)
            self.lines.append(f'{name} = model("{self.path(ref)}")')
        self.names[ref] = name
        return name


def model_ref(y: Y) -> Y:
    """`model: x` or `model: {model: {path: ..}, lora: ..}`: the reference string node."""
    if isinstance(y.value, dict):
        refuse(y, "a model given as a mapping is not supported: write it as a string, `path` or `path+lora`")
    return y
