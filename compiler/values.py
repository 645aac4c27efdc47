"""What recipe expressions evaluate to: plain values, selectors, and symbolic models.

A symbolic model knows its tensor names, shapes and dtypes (from safetensors
headers) and how each tensor is made, but holds no tensor data.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mgc.stdlib.operator import Operator

from mgc.core.dtypes import DType, keep_dtype
from mgc.core.errors import RecipeTypeError, Span
from .layer_kinds import rewrite_expert_rules
from .layers import LAYER_COUNT_KEYS, LAYER_INDEX_LISTS, PER_LAYER_LISTS, LayerMap, Unplaced, numbered_prefix


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: DType

    def __post_init__(self) -> None:
        keep_dtype(self)


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
    gradient: bool = False  # ramp(...): always a gradient across layers, never one value per model


@dataclass(frozen=True)
class Selector:
    """A table key. `_` matches everything; a name or string matches as a substring of the
    tensor name (mergekit's `filter`), or as a glob when it holds `*`, `?` or `[`;
    `layers[a:b]` matches the tensors of layers a <= i < b of the model's primary layer stack."""

    kind: str  # "default" | "pattern" | "layers"
    pattern: str = ""
    start: Optional[int] = None
    stop: Optional[int] = None
    span: Optional[Span] = field(default=None, compare=False)

    def matches(self, tensor: str, layers: LayerMap) -> bool:
        if self.kind == "default":
            return True
        if self.kind == "layers":
            place = layers.place(tensor)
            if isinstance(place, Unplaced):
                raise RecipeTypeError(
                    f"{self} cannot tell whether tensor '{tensor}' is in those layers: mgc cannot place its number "
                    "in a layer stack", self.span,
                    f"give these tensors an entry of their own before this one, e.g. \"{numbered_prefix(tensor)}\": ...",
                )
            if layers.ambiguous and place.stack is not None:
                shown = ", ".join(f"'{s.prefix}' ({s.count})" for s in layers.stacks)
                raise RecipeTypeError(
                    f"{self} is ambiguous: the model has several layer stacks ({shown})", self.span,
                    "select tensors by name instead, e.g. \"model.encoder.layers.*\"",
                )
            i = place.index if place.primary else None
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

    def lookup(self, tensor: str, layers: LayerMap) -> Optional["Value"]:
        for selector, value in self.entries:
            if selector.matches(tensor, layers):
                return value
        return None


class ModelValue:
    """A symbolic model: named tensor specs, its layer stacks, a config, and how deep its making is nested.

    `config()` follows the tensors: each kind of value derives its config from the values it is made of,
    so a config can never describe other tensors than the ones written (an operator over a `stack` keeps
    the stack's layer count)."""

    span: Span
    tensors: dict[str, TensorSpec]
    layers: LayerMap
    depth: int

    @property
    def num_layers(self) -> int:
        return self.layers.num_layers

    @property
    def config_source(self) -> "CheckpointModel":
        """The checkpoint whose config (and, by default, tokenizer) this value keeps."""
        raise NotImplementedError

    def config(self) -> dict:
        """config.json of this value (a fresh copy; derived once, so a value shared at every level of a deep
        recipe costs one derivation, not one per path to it)."""
        memo = self.__dict__.get("_config")
        if memo is None:
            memo = self.__dict__["_config"] = self._derive_config()
        return copy.deepcopy(memo)

    def _derive_config(self) -> dict:
        raise NotImplementedError

    def leaves(self) -> list["CheckpointModel"]:
        """The checkpoints whose tensors this value is made of (not Fisher weights), each once."""
        seen: dict[int, ModelValue] = {}
        found: dict[int, CheckpointModel] = {}
        todo: list[ModelValue] = [self]
        while todo:
            m = todo.pop()
            if id(m) in seen:
                continue
            seen[id(m)] = m
            if isinstance(m, CheckpointModel):
                found[id(m)] = m
            todo.extend(m.children())
        return list(found.values())

    def children(self) -> list["ModelValue"]:
        """The values whose tensors this one is made of."""
        return []


@dataclass(eq=False)
class CheckpointModel(ModelValue):
    checkpoint: Any  # mgc.core.checkpoint.Checkpoint
    span: Span
    tensors: dict[str, TensorSpec]
    layers: LayerMap
    depth: int = 0

    @property
    def config_source(self) -> "CheckpointModel":
        return self

    def _derive_config(self) -> dict:
        return self.checkpoint.config


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
    layers: LayerMap
    depth: int = 1

    @property
    def config_source(self) -> "CheckpointModel":
        return self.model

    def _derive_config(self) -> dict:
        return self.model.config()


@dataclass(eq=False)
class OpModel(ModelValue):
    op: Operator
    models: tuple[ModelValue, ...]
    base: Optional[ModelValue]
    params: dict[str, "Value"]
    resolved: dict[str, Any]  # tensor name -> validated params (an instance of op.params)
    span: Span
    tensors: dict[str, TensorSpec]
    layers: LayerMap
    depth: int
    aux: dict[str, tuple[ModelValue, ...]] = field(default_factory=dict)  # model-valued params, by name

    @property
    def inputs(self) -> tuple[ModelValue, ...]:
        return ((self.base,) if self.base is not None else ()) + self.models

    @property
    def config_source(self) -> "CheckpointModel":
        return self.inputs[0].config_source

    def _derive_config(self) -> dict:
        return self.inputs[0].config()

    def children(self) -> list[ModelValue]:
        return list(self.inputs)


@dataclass(eq=False)
class WithModel(ModelValue):
    value: ModelValue
    overrides: tuple[tuple[Selector, ModelValue], ...]
    span: Span
    tensors: dict[str, TensorSpec]
    layers: LayerMap
    depth: int

    def source_of(self, tensor: str) -> ModelValue:
        for selector, model in self.overrides:
            if selector.matches(tensor, self.layers):
                return model
        return self.value

    @property
    def config_source(self) -> "CheckpointModel":
        return self.value.config_source

    def _derive_config(self) -> dict:
        return self.value.config()

    def children(self) -> list[ModelValue]:
        return [self.value] + [m for _, m in self.overrides]


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
    layers: LayerMap
    depth: int
    # output tensor name -> (source model, source tensor name)
    sources: dict[str, tuple[ModelValue, str]]

    @property
    def config_source(self) -> "CheckpointModel":
        return self.parts[0].model.config_source

    def children(self) -> list[ModelValue]:
        return [p.model for p in self.parts]

    def _derive_config(self) -> dict:
        """The first part's config with the layer count, and every per-layer list, following the output's
        layers: output layer j takes the entries of the layer it was copied from, in that layer's model."""
        first = self.parts[0].model
        config = first.config()
        path = first.layers.primary.config_path if first.layers.primary is not None else None
        old = first.num_layers
        if path is None:
            config["num_hidden_layers"] = self.num_layers
            return config
        where = _sub_config(config, path[:-1])
        for key in dict(where):
            if key in LAYER_COUNT_KEYS and where[key] == old:
                where[key] = self.num_layers
        if path[:-1]:  # a text sub-config: a top-level count that mirrors it follows too
            for key in LAYER_COUNT_KEYS:
                if config.get(key) == old:
                    config[key] = self.num_layers
        sources = [(part, i) for part in self.parts for i in range(part.start, part.stop)]
        part_configs = {id(part): _sub_config(part.model.config(), path[:-1]) for part in self.parts}
        for key in PER_LAYER_LISTS:
            if isinstance(where.get(key), list):
                new = []
                for part, i in sources:
                    entries = part_configs[id(part)].get(key)
                    if not isinstance(entries, list) or len(entries) != part.model.num_layers:
                        raise RecipeTypeError(
                            f"stack(): the config of the model at {part.span} has no '{key}' entry for each of its "
                            f"{part.model.num_layers} layers, which the first part's config has", part.span,
                        )
                    new.append(entries[i])
                where[key] = new
        for key in LAYER_INDEX_LISTS:
            if isinstance(where.get(key), list):
                where[key] = [
                    j for j, (part, i) in enumerate(sources) if i in (part_configs[id(part)].get(key) or ())
                ]
        rewrite_expert_rules(where, sources, part_configs)
        return config


def _sub_config(config: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else {}


def stack_sources(parts: tuple[LayerRange, ...]) -> dict[str, tuple[ModelValue, str]]:
    """Renumber the parts' layers (of their primary stacks) consecutively; every other tensor comes from the
    first part."""
    sources: dict[str, tuple[ModelValue, str]] = {}
    first = parts[0].model
    for name in first.tensors:
        if first.layers.layer(name) is None:
            sources[name] = (first, name)
    offset = 0
    for part in parts:
        layers = part.model.layers
        for name in part.model.tensors:
            i = layers.layer(name)
            if i is not None and part.start <= i < part.stop:
                sources[layers.rename(name, offset + i - part.start)] = (part.model, name)
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
    }.get(type(value)) or getattr(value, "described_as", "a model")
