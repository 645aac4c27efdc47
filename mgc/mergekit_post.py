"""The tensors a mergekit `slices:` merge takes from its last slice: its architecture's `post_weights`, the
final norm and the head (mergekit's plan.py merges them over the last slice's sources, while the embeddings,
its `pre_weights`, come from the first slice as in mgc's `stack`).

mgc's selectors name tensors, not roles, so the importer reads the tensor names of a local source (the
safetensors headers only) and writes those names: every tensor outside the layer stacks that is the head
(`lm_head.weight`, GPT-NeoX's `embed_out.weight`, a head bias) or lies beside the language model's layers and is
no embedding (`model.norm.weight`; GPT-2's `transformer.ln_f.weight` and `.bias`, but not `wte` or `wpe`;
Phi's `model.final_layernorm.*`). A tied model stores no head, and none is named: its head is the first
slice's embedding, as in mergekit, which skips the optional head its last slice lacks. Where no source is a
local checkpoint, the Llama names are written and a comment says so."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mgc.compiler.heads import EMBEDDING_SUFFIXES, is_vocab_name
from mgc.compiler.layers import Place, layer_map
from mgc.core.checkpoint import Checkpoint
from mgc.core.errors import MgcError

LLAMA_POST_WEIGHTS = ('"model.norm"', "lm_head")
FALLBACK_NOTE = ("# the final norm and head from the last slice, as Llama names them: mgc import read no local "
                 "checkpoint;\n# for another architecture write its names (GPT-2: \"transformer.ln_f\")")


def _embedding_like(name: str) -> bool:
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) for s in EMBEDDING_SUFFIXES) or any(
        "embed" in p or p in ("wte", "wpe") for p in parts)


def post_weight_keys(folder: Optional[Path]) -> Optional[list[str]]:
    """The `with` keys of the final norm and head tensors of the checkpoint in `folder` (an empty list for a
    model that has none); None where `folder` is not a checkpoint mgc can read."""
    if folder is None:
        return None
    try:
        ckpt = Checkpoint.open(folder)
        try:
            tensors = list(ckpt.tensors)
            layers = layer_map(ckpt.config, tensors, str(folder))
        finally:
            ckpt.close()
    except (MgcError, OSError, ValueError):
        return None
    if layers.primary is None:
        return None
    stack_prefix = layers.primary.prefix.rstrip(".")
    beside = stack_prefix.rsplit(".", 1)[0] + "." if "." in stack_prefix else ""
    names = []
    for name in tensors:
        place = layers.place(name)
        if not isinstance(place, Place) or place.stack is not None:
            continue  # in a layer stack, or numbered in none
        if _embedding_like(name):
            continue
        if is_vocab_name(name) or name.startswith(beside):  # the head, or the final norm beside the layers
            names.append(name)
    return [selector_key(n, tensors) for n in sorted(names, key=lambda n: (is_vocab_name(n), n))]  # norm, head


def selector_key(name: str, tensors) -> str:
    """`name` as a `with` key that matches that tensor alone: a bare string matches as a substring, so a name
    inside another (a top-level `norm.weight` inside `layers.0.attention_norm.weight`) is written as a glob."""
    if any(name in t and t != name for t in tensors):
        return f'"{name[:-1]}[{name[-1]}]"'
    return f'"{name}"'
