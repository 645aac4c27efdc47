"""What checking a recipe produces: the outputs to write, and every input the run will read."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mgc.core.dtypes import DType
from mgc.core.errors import MgcError, Span

from .values import CheckpointModel, FisherModel, ModelValue


@dataclass
class SaveSpec:
    model: ModelValue
    path: Path
    dtype: DType  # of every floating tensor; non-floating ones keep their own
    shard_bytes: int
    tokenizer: Optional[CheckpointModel]
    span: Span
    config: dict = field(default_factory=dict)  # config.json of the output, derived from its tensors' sources
    vocab: Optional[object] = None  # compiler/vocab.py's OutputVocab: written tensors, vocabulary alignment, tokenizer
    adapter: Optional[object] = None  # compiler/extract_lora.py's AdapterLayout where the save writes a LoRA adapter


@dataclass
class Program:
    """A checked recipe: the outputs to write and every checkpoint it opened."""

    saves: list[SaveSpec]
    checkpoints: dict[Path, object] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    # fisher(...) values by cache folder: mgc.fisher computes the missing ones before a run
    fishers: dict[Path, FisherModel] = field(default_factory=dict)
    warnings: list[MgcError] = field(default_factory=list)  # reported by check, plan and run; nothing stops
    # search() domains by the place of their call (compiler/search_space.py), and the values given to some of them
    domains: dict = field(default_factory=dict)
    assignment: dict = field(default_factory=dict)
    # moe() gates (compiler/gate_cache.GateSpec) by cache folder: mgc.gates computes the missing ones before a run
    gates: dict[Path, object] = field(default_factory=dict)

    @property
    def free(self) -> dict:
        """The domains no value was given for: a run needs them bound (`--set`, or `mgc search`)."""
        return {k: d for k, d in self.domains.items() if k not in self.assignment}
