"""Provenance, the Hugging Face way: every output folder says how it was made.

- Each shard's safetensors header carries, in `__metadata__` (string values only, as safetensors requires), the
  recipe's text, its name and folder, mgc's version, and the identity of each checkpoint the save reads: its path
  (or `hf://org/name@commit`) and a sha256 of its safetensors headers (`headers_sha256`). A recipe longer than
  RECIPE_INLINE_BYTES is stored once, in the first shard, and the others name that shard (`mgc.recipe_in`).
- A model card, README.md, with YAML front matter (`base_model`, `library_name`, `tags`) and a body holding the
  recipe, the methods it uses with their references, and mgc's version.

`read_recipe(folder)` reads the recipe back (`mgc recipe`). docs/provenance.md describes the format.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from mgc.core.checkpoint import INDEX_FILE
from mgc.core.errors import CheckpointError
from mgc.core.paths import recipe_folder
from mgc.core.safetensors_header import DTYPE_CODES

FORMAT = "1"  # of the mgc.* metadata keys
RECIPE_INLINE_BYTES = 64 << 10  # a longer recipe is stored in the first shard only
CARD_FILE = "README.md"

KEY_FORMAT = "mgc.provenance"
KEY_VERSION = "mgc.version"
KEY_RECIPE = "mgc.recipe"
KEY_RECIPE_IN = "mgc.recipe_in"
KEY_RECIPE_SHA = "mgc.recipe_sha256"
KEY_RECIPE_NAME = "mgc.recipe_name"
KEY_RECIPE_FOLDER = "mgc.recipe_folder"
KEY_INPUTS = "mgc.inputs"


def mgc_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("mgc")
    except (ImportError, PackageNotFoundError):
        return "unknown"


# --- the inputs a save reads ---------------------------------------------------------------------------------

def _walk(model) -> list:
    """The checkpoints (and LoRA adapters) whose tensors `model` is made of, each once, in the order of the
    recipe's arguments (depth first)."""
    found: dict[int, object] = {}
    seen: set[int] = set()
    todo = [model]
    while todo:
        m = todo.pop()
        if isinstance(m, tuple):  # a LoRA adapter, listed after its base
            found.setdefault(id(m[0]), m[0])
            continue
        if id(m) in seen:
            continue
        seen.add(id(m))
        ckpt = getattr(m, "checkpoint", None)
        if ckpt is not None and type(m).__name__ == "CheckpointModel":
            found.setdefault(id(ckpt), ckpt)
        adapter = getattr(m, "adapter", None)
        if adapter is not None:
            todo.append((adapter,))
        todo.extend(reversed(m.children()))
    return list(found.values())


def identity(ckpt) -> str:
    """`hf://org/name@sha` for a hub checkpoint, else its folder's path (a LoRA adapter: its folder)."""
    hub_id = getattr(ckpt, "hub_id", None)
    if hub_id:
        return hub_id
    return str(getattr(ckpt, "folder", None) or ckpt.path)


def card_id(ckpt) -> str:
    """What the model card's `base_model` says: `org/name` for a hub checkpoint, else the path."""
    rev = getattr(ckpt, "revision", None)
    return rev.repo_id if rev is not None else identity(ckpt)


def headers_sha256(ckpt) -> str:
    """sha256 over the checkpoint's tensor headers as validated: for each file in order, its name, then each
    tensor (by offset) with its name, dtype, shape and offset. It changes whenever a tensor is added, removed,
    renamed, reshaped, retyped or moved; it needs no read of tensor data, nor of a hub shard not downloaded."""
    h = hashlib.sha256()
    by_file: dict[str, list] = {}
    for info in ckpt.tensors.values():
        by_file.setdefault(Path(info.file).name, []).append(info)
    for file in [Path(f).name for f in ckpt.files]:
        infos = sorted(by_file.pop(file, []), key=lambda i: (i.offset, i.name))
        entry = [file, [[i.name, DTYPE_CODES.get(i.dtype, str(i.dtype)), list(i.shape), i.offset] for i in infos]]
        h.update(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
    for file, infos in sorted(by_file.items()):  # tensors of files not listed (not expected)
        entry = [file, [[i.name, DTYPE_CODES.get(i.dtype, str(i.dtype)), list(i.shape), i.offset]
                        for i in sorted(infos, key=lambda i: (i.offset, i.name))]]
        h.update(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


def save_inputs(save) -> list:
    return _walk(save.model)


# --- what a save writes ----------------------------------------------------------------------------------------

class Provenance:
    """The provenance of one save of a plan."""

    def __init__(self, plan, save):
        source = plan.recipe.source
        self.recipe = source.text
        self.recipe_name = source.name
        self.recipe_folder = str(recipe_folder(source.name))  # what its relative paths were resolved against
        self.version = mgc_version()
        self.inputs = save_inputs(save)
        self.hashes = [headers_sha256(c) for c in self.inputs]
        self.methods = _methods(save.model)

    def metadata(self) -> tuple[dict[str, str], dict[str, str]]:
        """(metadata of every shard, metadata of the first shard only)."""
        every = {
            KEY_FORMAT: FORMAT,
            KEY_VERSION: self.version,
            KEY_RECIPE_NAME: self.recipe_name,
            KEY_RECIPE_FOLDER: self.recipe_folder,
            KEY_RECIPE_SHA: hashlib.sha256(self.recipe.encode()).hexdigest(),
            KEY_INPUTS: json.dumps([{"model": identity(c), "headers_sha256": h} for c, h in zip(self.inputs, self.hashes)]),
        }
        first = {}
        if len(self.recipe.encode()) <= RECIPE_INLINE_BYTES:
            every[KEY_RECIPE] = self.recipe
        else:
            first[KEY_RECIPE] = self.recipe
        return every, first

    def card(self) -> str:
        from mgc.stdlib import OPERATORS

        ids = list(dict.fromkeys(card_id(c) for c in self.inputs))
        lines = ["---", "base_model:"]
        lines += [f"- {json.dumps(i)}" for i in ids] if ids else []
        if not ids:
            lines[-1] = "base_model: []"
        lines += ["library_name: transformers", "tags:", "- merge", "- mgc", "---", ""]
        lines += ["# Merged model", "",
                  f"This model was made by merging {len(ids)} checkpoint{'s' if len(ids) != 1 else ''} with "
                  f"mgc {self.version}, the merge-graph compiler.", ""]
        if self.methods:
            lines += ["## Methods", ""]
            for name in self.methods:
                op = OPERATORS.get(name)
                ref = getattr(op, "reference", "") if op is not None else ""
                lines.append(f"- `{name}`" + (f": {ref}" if ref else ""))
            lines.append("")
        lines += ["## Inputs", ""]
        lines += [f"- `{identity(c)}` (headers sha256 `{h}`)" for c, h in zip(self.inputs, self.hashes)]
        fence = "```"
        while fence in self.recipe:
            fence += "`"
        lines += ["", "## Recipe", "", f"`{self.recipe_name}`; its relative paths are relative to "
                  f"`{self.recipe_folder}`. `mgc recipe <this folder>` prints it.", "",
                  f"{fence}merge", self.recipe.rstrip("\n"), fence, ""]
        return "\n".join(lines)


def _methods(model) -> list[str]:
    """The operators a value applies, each once, in the order of the recipe's arguments."""
    found: dict[str, None] = {}
    seen: set[int] = set()
    todo = [model]
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        op = getattr(m, "op", None)
        name = getattr(op, "name", None)
        if isinstance(name, str):
            found.setdefault(name, None)
        todo.extend(reversed(m.children()))
    return list(found)


# --- reading it back -------------------------------------------------------------------------------------------

def _shards(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / f for f in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{folder}: {INDEX_FILE} cannot be read") from None
    single = [folder / name for name in ("model.safetensors", "adapter_model.safetensors")]  # an adapter: extract_lora()
    return [f for f in single if f.is_file()][:1]


def shard_metadata(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 << 20:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


NOT_MGC_HINT = "`mgc recipe` reads the recipe that mgc stores in the safetensors metadata of every output it writes"


def read_provenance(folder: Path) -> dict:
    """The mgc.* metadata of an output folder, the recipe included (from the first shard where it is stored
    there only). CheckpointError for a folder mgc did not write."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no folder at '{folder}'", hint="give the output folder of a `mgc run`")
    shards = _shards(folder)
    if not shards:
        raise CheckpointError(f"{folder}: no safetensors checkpoint in this folder", hint=NOT_MGC_HINT)
    meta = shard_metadata(shards[0])
    if KEY_FORMAT not in meta:
        raise CheckpointError(f"{folder}: this checkpoint was not written by mgc (no recipe in its metadata)",
                              hint=NOT_MGC_HINT)
    if KEY_RECIPE not in meta and KEY_RECIPE_IN in meta:
        meta = {**meta, **shard_metadata(folder / Path(meta[KEY_RECIPE_IN]).name)}
    recipe: Optional[str] = meta.get(KEY_RECIPE)
    if recipe is None:
        raise CheckpointError(f"{shards[0]}: the mgc metadata holds no recipe", hint=NOT_MGC_HINT)
    if hashlib.sha256(recipe.encode()).hexdigest() != meta.get(KEY_RECIPE_SHA):
        raise CheckpointError(f"{folder}: the stored recipe does not match its sha256 (the file was altered)")
    return meta


# --- a printed recipe that runs from any folder ----------------------------------------------------------------

def absolute_paths(text: str, name: str, folder: str) -> str:
    """`text` with each relative path of the recipe (model(...) and lora(...) folders, fisher()'s `data`, and
    `save ... to`) made absolute against `folder`, the folder it was resolved against when it ran; `~` expanded.
    Hub ids (hf://...) and absolute paths stay as they are; nothing else changes, comments included."""
    import dataclasses
    import os

    from mgc.core.hub import PREFIX
    from mgc.grammar import ast, parse
    from mgc.grammar.edits import SpanText

    tree = parse(text, name)
    spans: list = []  # (span, path text)

    def visit(node) -> None:
        if isinstance(node, (list, tuple)):
            for x in node:
                visit(x)
            return
        if not dataclasses.is_dataclass(node) or isinstance(node, (ast.Span, ast.Source)):
            return
        if isinstance(node, ast.Call):
            if node.func in ("model", "lora") and node.args and isinstance(node.args[0], ast.String):
                spans.append(node.args[0])
            for kw in node.kwargs:
                if node.func == "fisher" and kw.name == "data" and isinstance(kw.value, ast.String):
                    spans.append(kw.value)
        if isinstance(node, ast.Save):
            spans.append(ast.String(node.path, node.path_span))
        for f in dataclasses.fields(node):
            if f.name not in ("span", "source") and not f.name.endswith("_span"):
                visit(getattr(node, f.name))

    visit(tree.statements)
    source = SpanText(text)
    edits = []
    for s in spans:
        value = s.value
        if value.startswith(PREFIX) or os.path.isabs(value):
            continue
        begin, end = source.offsets(s.span)
        if text[begin] != '"' or text[end - 1] != '"':
            continue  # not a string literal's span: left as it is
        edits.append((begin, end, json.dumps(os.path.join(folder, os.path.expanduser(value)), ensure_ascii=False)))
    return source.replaced(edits)
