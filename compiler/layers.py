"""Where a tensor sits in the transformer stack, read from its name.

One pattern per naming family; the first that matches gives the layer index.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

LAYER_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    # Llama, Mistral, Mixtral, Qwen2/3, Gemma 1-3, Phi-3, OLMo, DeepSeek: model.layers.N.
    ("llama", re.compile(r"^(?P<prefix>(?:model\.(?:language_model\.)?)?layers\.)(?P<index>\d+)(?P<rest>\..*)$")),
    # GPT-2, GPT-J, Falcon, Bloom, StarCoder: transformer.h.N.
    ("gpt2", re.compile(r"^(?P<prefix>(?:transformer\.)?h\.)(?P<index>\d+)(?P<rest>\..*)$")),
    # GPT-NeoX, Pythia: gpt_neox.layers.N.
    ("neox", re.compile(r"^(?P<prefix>gpt_neox\.layers\.)(?P<index>\d+)(?P<rest>\..*)$")),
    # OPT, BART decoders: model.decoder.layers.N.
    ("decoder", re.compile(r"^(?P<prefix>model\.decoder\.layers\.)(?P<index>\d+)(?P<rest>\..*)$")),
    # MPT, DBRX: transformer.blocks.N.
    ("blocks", re.compile(r"^(?P<prefix>transformer\.blocks\.)(?P<index>\d+)(?P<rest>\..*)$")),
)

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(tensor: str) -> Optional[int]:
    for _, pattern in LAYER_PATTERNS:
        m = pattern.match(tensor)
        if m:
            return int(m.group("index"))
    return None


def rename_layer(tensor: str, index: int) -> str:
    for _, pattern in LAYER_PATTERNS:
        m = pattern.match(tensor)
        if m:
            return f"{m.group('prefix')}{index}{m.group('rest')}"
    raise ValueError(f"{tensor} is not a layer tensor")


def count_layers(config: Mapping, tensors) -> int:
    """Layers per config.json, else one more than the largest index among the tensor names."""
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    indices = [i for i in map(layer_index, tensors) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_position(layer: Optional[int], num_layers: int) -> float:
    """t in [0, 1] at which a gradient is read: i/(L-1) for layer i of L; 0 outside the layers.

    A model of a single layer reads t = 1, as mergekit does."""
    if layer is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, layer / (num_layers - 1))


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
