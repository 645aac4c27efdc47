"""Where a tensor sits in a model's layer stacks, read from its config and its tensor names.

A layer stack is a run of numbered blocks under one prefix whose last word names blocks
(`model.layers.N.`, `transformer.h.N.`, `vision_tower.vision_model.encoder.layers.N.`,
`visual.blocks.N.`): the tensors hold indices 0..K-1, all present. A model has one *primary*
stack, its language model's, which `layers[a:b]`, `m.layers[a:b]` and `stack()` address and whose
count config.json states (`num_hidden_layers`, at the top level or under `text_config`); a
vision-language model also has others (its vision tower's), which gradients place by their own depth.

A tensor is then either outside the stacks (no number in its name: embeddings, final norm, head),
in a stack at an index, or *unplaced*: a numbered name in no stack (`visual.merger.mlp.0.weight`).
A per-layer value is never applied to an unplaced tensor: that is an error at check time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

from mgc.core.errors import CheckpointError

STACK_WORDS = frozenset({"layers", "layer", "h", "blocks", "block"})
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
TEXT_CONFIGS = ("text_config", "language_config", "llm_config", "text_model_config")
# per-layer lists in a config: one entry per layer of the primary stack, or a list of layer indices
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")  # Qwen-MoE's dense layers, Llama 4's expert layers


def _split(tensor: str) -> Optional[tuple[str, int, str]]:
    """(prefix up to the first numeric component, its value, the rest) or None for a name without one."""
    parts = tensor.split(".")
    for k, part in enumerate(parts):
        if part.isdigit() and k > 0:
            prefix = ".".join(parts[:k]) + "."
            rest = "." + ".".join(parts[k + 1:]) if k + 1 < len(parts) else ""
            return prefix, int(part), rest
    return None


def numbered_prefix(tensor: str) -> str:
    """The name up to its first number (`visual.merger.mlp` of `visual.merger.mlp.0.weight`): a selector for
    the tensors numbered under it."""
    split = _split(tensor)
    return tensor if split is None else split[0].rstrip(".")


def leading_index(tensor: str) -> Optional[int]:
    """The first number in a tensor's name: an ordering key (block by block), not a placement."""
    split = _split(tensor)
    return None if split is None else split[1]


def block_of(tensor: str) -> int:
    """The block a tensor is merged in: its leading index, or -1 (before every layer) when it has none."""
    i = leading_index(tensor)
    return -1 if i is None else i


def tensor_order(name: str) -> tuple:
    """Non-layer tensors first, then layer by layer; names in natural order within."""
    return (block_of(name), name)


@dataclass(frozen=True)
class Stack:
    prefix: str  # the name up to the index, e.g. "model.layers."
    count: int
    config_path: Optional[tuple[str, ...]] = None  # where config.json states the count, e.g. ("text_config", "num_hidden_layers")


@dataclass(frozen=True)
class Place:
    """A tensor's place: in `stack` at `index`; or outside every stack (stack None)."""

    stack: Optional[Stack]
    index: int = 0
    primary: bool = False

    def position(self) -> float:
        """Where a gradient is read, in [0, 1]: i/(K-1) for layer i of K; 0 outside the stacks.
        A stack of a single layer reads 1, as mergekit does."""
        if self.stack is None:
            return 0.0
        if self.stack.count <= 1:
            return 1.0
        return min(1.0, self.index / (self.stack.count - 1))


class Unplaced:
    """A numbered tensor name that is in no layer stack mgc knows."""

    def __init__(self, tensor: str):
        self.tensor = tensor


OUTSIDE = Place(None)


@dataclass(frozen=True)
class LayerMap:
    stacks: tuple[Stack, ...]
    primary: Optional[Stack]
    ambiguous: bool = False  # several stacks could be the language model's

    @property
    def num_layers(self) -> int:
        return self.primary.count if self.primary is not None else 0

    def place(self, tensor: str) -> Union[Place, Unplaced]:
        split = _split(tensor)
        if split is None:
            return OUTSIDE
        prefix, index, _ = split
        for stack in self.stacks:
            if stack.prefix == prefix and index < stack.count:
                return Place(stack, index, stack is self.primary)
        return Unplaced(tensor)

    def layer(self, tensor: str) -> Optional[int]:
        """The index of a tensor in the primary stack, or None for any other tensor."""
        place = self.place(tensor)
        return place.index if isinstance(place, Place) and place.primary else None

    def rename(self, tensor: str, index: int) -> str:
        prefix, _, rest = _split(tensor)
        return f"{prefix}{index}{rest}"

    def with_primary_count(self, count: int) -> "LayerMap":
        if self.primary is None:
            return self
        new = Stack(self.primary.prefix, count, self.primary.config_path)
        return LayerMap(tuple(new if s is self.primary else s for s in self.stacks), new, self.ambiguous)


def find_stacks(tensors, where: str = "the checkpoint") -> list[Stack]:
    """The layer stacks among tensor names: numbered runs 0..K-1 under a prefix ending in a block word.
    A run with a gap (a layer without tensors) is a damaged checkpoint."""
    indices: dict[str, set[int]] = {}
    for name in tensors:
        split = _split(name)
        if split is not None and split[0].rstrip(".").rsplit(".", 1)[-1] in STACK_WORDS:
            indices.setdefault(split[0], set()).add(split[1])
    stacks = []
    for prefix, found in sorted(indices.items()):
        missing = sorted(set(range(max(found) + 1)) - found)
        if missing:
            raise CheckpointError(
                f"{where}: layers {prefix}0..{max(found)} have no tensors for layer {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                hint="a layer's weights are missing: the checkpoint is incomplete or damaged",
            )
        stacks.append(Stack(prefix, len(found)))
    return stacks


def _count_entries(config: Mapping) -> list[tuple[tuple[str, ...], int]]:
    """Layer counts stated in config.json: at the top level, then in a text sub-config."""
    out = []
    for path_prefix, sub in [((), config)] + [((k,), config.get(k)) for k in TEXT_CONFIGS]:
        if not isinstance(sub, Mapping):
            continue
        for key in LAYER_COUNT_KEYS:
            value = sub.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                out.append((path_prefix + (key,), value))
    return out


_OTHER_MODALITIES = ("vision", "visual", "image", "audio", "speech")


def layer_map(config: Mapping, tensors, where: str = "the checkpoint") -> LayerMap:
    """The stacks of a model from its config and tensor names, the stated count cross-checked against the
    tensors (a CheckpointError naming `where` when they disagree)."""
    stacks = find_stacks(tensors, where)
    counts = _count_entries(config)
    stated = counts[0] if counts else None
    primary: Optional[Stack] = None
    ambiguous = False
    if len(stacks) == 1:
        primary = stacks[0]
    elif len(stacks) > 1:
        candidates = stacks
        if stated is not None:
            candidates = [s for s in stacks if s.count == stated[1]] or stacks
        if len(candidates) > 1:
            text = [s for s in candidates if not any(w in s.prefix for w in _OTHER_MODALITIES)]
            candidates = text if text else candidates
        if len(candidates) == 1:
            primary = candidates[0]
        else:
            ambiguous = True
    if stated is not None:
        path, value = stated
        found = primary.count if primary is not None else 0
        if primary is not None and value != found:
            shown = ".".join(path)
            held = f"layers 0..{found - 1} under '{primary.prefix}'"
            raise CheckpointError(
                f"{where}: config.json says {shown} = {value}, but the tensors hold {held}",
                hint="the config and the weights disagree: fix config.json, or re-save the checkpoint",
            )
        if primary is not None:
            primary = Stack(primary.prefix, primary.count, path)
            stacks = [primary if s.prefix == primary.prefix else s for s in stacks]
    return LayerMap(tuple(stacks), primary, ambiguous)


def interpolate(points, t: float) -> float:
    """mergekit's gradient: piecewise linear between evenly spaced points over t in [0, 1]."""
    if len(points) == 1:
        return float(points[0])
    scaled = t * (len(points) - 1)
    i = int(scaled)
    if i >= len(points) - 1:
        return float(points[-1])
    frac = scaled - i
    return float((1 - frac) * points[i] + frac * points[i + 1])
