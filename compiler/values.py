"""What recipe expressions evaluate to: plain values, selectors, and symbolic models.

A symbolic model knows its tensor names, shapes and dtypes (from safetensors
headers) and how each tensor is made, but holds no tensor data.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mgc.stdlib.operator import Operator

from .errors import Span
from .layers import layer_index, rename_layer


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Num:
    value: Union[int, float]
    span: Span


@dataclass(frozen=True)
class Str:
    value: str
    span: Span


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True)
class ListV:
    items: tuple["Value", ...]
    span: Span


@dataclass(frozen=True)
class Selector:
    """A table key. `_` matches everything; a name or string matches as a substring of the
    tensor name (mergekit's `filter`), or as a glob when it holds `*`, `?` or `[`;
    `layers[a:b]` matches the tensors of layers a <= i < b."""

    kind: str  # "default" | "pattern" | "layers"
    pattern: str = ""
    start: Optional[int] = None
    stop: Optional[int] = None
    span: Optional[Span] = field(default=None, compare=False)

    def matches(self, tensor: str) -> bool:
        if self.kind == "default":
            return True
        if self.kind == "layers":
            i = layer_index(tensor)
            return i is not None and (self.start is None or i >= self.start) and (self.stop is None or i < self.stop)
        if any(c in self.pattern for c in "*?["):
            return fnmatch.fnmatchcase(tensor, self.pattern)
        return self.pattern in tensor

    def __str__(self) -> str:
        if self.kind == "default":
            return "_"
        if self.kind == "layers":
            return f"layers[{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}]"
        return self.pattern


@dataclass(frozen=True)
class TableV:
    entries: tuple[tuple[Selector, "Value"], ...]
    span: Span

    def lookup(self, tensor: str) -> Optional["Value"]:
        for selector, value in self.entries:
            if selector.matches(tensor):
                return value
        return None


class ModelValue:
    """A symbolic model: named tensor specs, a layer count, and the checkpoint whose config it keeps."""

    span: Span
    tensors: dict[str, TensorSpec]
    num_layers: int

    @property
    def config_source(self) -> "CheckpointModel":
        raise NotImplementedError

    def config(self) -> dict:
        return dict(self.config_source.checkpoint.config)


@dataclass(eq=False)
class CheckpointModel(ModelValue):
    checkpoint: Any  # mgc.runtime.checkpoint.Checkpoint
    span: Span
    tensors: dict[str, TensorSpec]
    num_layers: int

    @property
    def config_source(self) -> "CheckpointModel":
        return self


@dataclass(eq=False)
class FisherModel(ModelValue):
    """`fisher(m, data = "...")`: the diagonal Fisher of checkpoint model `m` on a text file. Its tensors are m's
    names and shapes in float32; they are computed before the run (mgc.fisher) into the cache folder
    `cache_path`, known from `key` at check time, and lowered to loads from that folder."""

    model: CheckpointModel
    data: Path
    samples: int
    max_length: int
    key: str
    cache_path: Path
    span: Span
    tensors: dict[str, TensorSpec]
    num_layers: int

    @property
    def config_source(self) -> "CheckpointModel":
        return self.model


@dataclass(eq=False)
class OpModel(ModelValue):
    op: Operator
    models: tuple[ModelValue, ...]
    base: Optional[ModelValue]
    params: dict[str, "Value"]
    resolved: dict[str, Any]  # tensor name -> validated params (an instance of op.params)
    span: Span
    tensors: dict[str, TensorSpec]
    num_layers: int
    aux: dict[str, tuple[ModelValue, ...]] = field(default_factory=dict)  # model-valued params, by name

    @property
    def inputs(self) -> tuple[ModelValue, ...]:
        return ((self.base,) if self.base is not None else ()) + self.models

    @property
    def config_source(self) -> "CheckpointModel":
        return self.inputs[0].config_source


@dataclass(eq=False)
class WithModel(ModelValue):
    value: ModelValue
    overrides: tuple[tuple[Selector, ModelValue], ...]
    span: Span
    tensors: dict[str, TensorSpec]
    num_layers: int

    def source_of(self, tensor: str) -> ModelValue:
        for selector, model in self.overrides:
            if selector.matches(tensor):
                return model
        return self.value

    @property
    def config_source(self) -> "CheckpointModel":
        return self.value.config_source


@dataclass(frozen=True)
class LayerRange:
    model: ModelValue
    start: int
    stop: int
    span: Span


@dataclass(eq=False)
class StackModel(ModelValue):
    parts: tuple[LayerRange, ...]
    span: Span
    tensors: dict[str, TensorSpec]
    num_layers: int
    # output tensor name -> (source model, source tensor name)
    sources: dict[str, tuple[ModelValue, str]]

    @property
    def config_source(self) -> "CheckpointModel":
        return self.parts[0].model.config_source

    def config(self) -> dict:
        config = super().config()
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if key in config:
                config[key] = self.num_layers
        if not any(k in config for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")):
            config["num_hidden_layers"] = self.num_layers
        for key in ("layer_types",):  # per-layer lists must follow the new layer count
            if isinstance(config.get(key), list):
                old = config[key]
                config[key] = [old[min(i, len(old) - 1)] for i in range(self.num_layers)]
        return config


def stack_sources(parts: tuple[LayerRange, ...]) -> dict[str, tuple[ModelValue, str]]:
    """Renumber the parts' layers consecutively; non-layer tensors come from the first part."""
    sources: dict[str, tuple[ModelValue, str]] = {}
    first = parts[0].model
    for name in first.tensors:
        if layer_index(name) is None:
            sources[name] = (first, name)
    offset = 0
    for part in parts:
        for name in part.model.tensors:
            i = layer_index(name)
            if i is not None and part.start <= i < part.stop:
                sources[rename_layer(name, offset + i - part.start)] = (part.model, name)
        offset += part.stop - part.start
    return sources


@dataclass(frozen=True)
class Function:
    """A `def`, callable like an operator; its body is evaluated at each call."""

    node: Any  # compiler.ast.Def


Value = Union[Num, Str, Bool, ListV, TableV, ModelValue, LayerRange, Function]


def kind_of(value: Value) -> str:
    return {
        Num: "a number", Str: "a string", Bool: "a boolean", ListV: "a list", TableV: "a selector table",
        LayerRange: "a layer range", Function: "a function",
    }.get(type(value), "a model")
