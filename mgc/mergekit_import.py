"""`mgc import CONFIG.yml`: a mergekit configuration translated into a `.merge` recipe.

The YAML is read node by node (yaml's composer keeps each node's line and column), so whatever mgc cannot
express is refused as an MgcError at the YAML's own file:line:col, with the reason.

The translation keeps mergekit's numbers where the two tools read the same words differently
(docs/migration.md):

- a list under `parameters` is a gradient in mergekit; in mgc a bare list on a per-model parameter is one
  value per model, so gradients are written `ramp(...)`;
- mergekit's gradients restart in every slice, so each slice becomes a model of its own,
  `stack(m.layers[a:b])`, whose layers the ramp spans; a one-layer slice reads the gradient's last point
  (mergekit's t = 1 there) and its non-layer tensors the first;
- a `slices:` merge takes its embeddings from the first slice (as mgc's `stack` does) and its final norm and
  head from the last, so the stack is followed by `with { "model.norm.weight": last, "lm_head.weight": last }`,
  the names read from a local source's safetensors headers (mgc/mergekit_post.py).

This module writes the recipe's text (and orders mergekit-multi's documents); the work is in
mgc/mergekit_yaml.py (the YAML with line marks, the refusals), mergekit_models.py (model statements),
mergekit_params.py (parameters at every level, filters as tables, gradients as ramps), mergekit_slices.py
(one document: models: or slices: as stacks) and mergekit_options.py (the save options).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mgc.core.errors import MgcError
from mgc.mergekit_models import Importer
from mgc.mergekit_moe import is_moe, translate_moe
from mgc.mergekit_slices import translate
from mgc.mergekit_yaml import MergekitImportError, Y, load_yaml, mapping, refuse, string

__all__ = ["import_config", "MergekitImportError"]


def import_config(config: Path, text: Optional[str] = None, output: Optional[Path] = None,
                  root: Optional[Path] = None) -> str:
    """The recipe text for a mergekit (or mergekit-multi) configuration file."""
    config = Path(config)
    if text is None:
        try:
            text = config.read_text(encoding="utf-8")
        except OSError as e:
            raise MgcError(f"cannot read {config}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise MergekitImportError(f"{config} is not UTF-8 text (byte {e.start})",
                                      hint="a mergekit configuration is a YAML text file") from None
    name = str(config)
    docs = load_yaml(text, name)
    if not docs:
        raise MergekitImportError(f"{name} holds no YAML document")
    out_dir = (Path(output).parent if output is not None else Path.cwd())
    imp = Importer(config, out_dir, Path(root) if root is not None else Path.cwd())
    if len(docs) == 1 and is_moe(docs[0]):  # a mergekit-moe configuration
        return translate_moe(imp, docs[0], config)
    # mergekit-multi: every document but the final one has a name; later documents use it as a model
    named = {}
    final = None
    for d in docs:
        f = mapping(d, "a mergekit configuration")
        if "name" in f:
            n = string(f["name"], "name")
            if n in named:
                refuse(f["name"], f"two merges are named '{n}'")
            named[n] = d
        elif final is not None:
            refuse(d, "more than one merge without a name", "mergekit-multi allows one unnamed (final) merge")
        else:
            final = d
    if len(docs) > 1 and final is None:
        final = docs[-1]
    order = _dependency_order(docs, named)
    body, opts = [], {}
    for d in order:
        f = d.value
        is_final = d is final or len(docs) == 1
        var = "merged" if is_final else imp.var(f["name"].value)
        if not is_final:
            imp.merges[f["name"].value] = var
        expr, o = translate(imp, d, var)
        if not is_final and any(k in o for k in ("tokenizer", "tokens", "chat_template", "pad_to_multiple_of")):
            imp.notes.append(f"{f['name'].value}: its tokenizer settings apply only to mergekit's intermediate output")
        body.append((f.get("name").value if "name" in f else None, expr))
        if is_final:
            opts = o
    header = [f"# imported from {config.name} (a mergekit configuration) by `mgc import`"]
    if len(docs) > 1:
        header.append("# a mergekit-multi file: each named merge is an expression, used where later merges name it")
    for n in imp.notes:
        header.append(f"# left out, changes no number in mgc: {n}")
    width = max((len(line.split(" = ", 1)[0]) for line in imp.lines), default=0)
    models = [f"{n:<{width}} = {v}" for n, v in (line.split(" = ", 1) for line in imp.lines)]  # as `mgc fmt` aligns
    lines = header + [""] + models + [""]
    for n, expr in body:
        if n is not None and len(docs) > 1:
            lines.append(f"# {n}")
        lines.append(expr)
        lines.append("")
    optext = "".join(f", {k} = {v}" for k, v in opts.items())[2:]
    lines.append('save merged to "merged"' + (f" {{ {optext} }}" if optext else ""))
    return "\n".join(lines) + "\n"


def _dependency_order(docs: list[Y], named: dict[str, Y]) -> list[Y]:
    """The documents in an order where each comes after the merges it names."""
    def refs(d: Y) -> list[tuple[str, Y]]:
        found = []

        def walk(y: Y, key: Optional[str]):
            if isinstance(y.value, dict):
                for k, v in y.value.items():
                    walk(v, k)
            elif isinstance(y.value, list):
                for v in y.value:
                    walk(v, key)
            elif key in ("model", "base_model", "tokenizer_source", "source") and isinstance(y.value, str):
                for part in y.value.split("+"):
                    if part in named:
                        found.append((part, y))
        walk(d, None)
        return found

    order, state = [], {}

    def visit(d: Y, via: Optional[Y]):
        key = id(d)
        if state.get(key) == "done":
            return
        if state.get(key) == "busy":
            refuse(via or d, "the merges name each other in a cycle")
        state[key] = "busy"
        for n, y in refs(d):
            visit(named[n], y)
        state[key] = "done"
        order.append(d)

    for d in docs:
        visit(d, None)
    return order
