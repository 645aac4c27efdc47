"""What checking a recipe produces: the outputs to write, and every input the run will read."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mgc.core.errors import MgcError, Span

from .values import CheckpointModel, FisherModel, ModelValue


@dataclass
class SaveSpec:
    model: ModelValue
    path: Path
    dtype: torch.dtype  # of every floating tensor; non-floating ones keep their own
    shard_bytes: int
    tokenizer: Optional[CheckpointModel]
    span: Span
    config: dict = field(default_factory=dict)  # config.json of the output, derived from its tensors' sources
    vocab: Optional[object] = None  # compiler/vocab.py's OutputVocab: written tensors, vocabulary alignment, tokenizer


@dataclass
class Program:
    """A checked recipe: the outputs to write and every checkpoint it opened."""

    saves: list[SaveSpec]
    checkpoints: dict[Path, object] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    # fisher(...) values by cache folder: mgc.fisher computes the missing ones before a run
    fishers: dict[Path, FisherModel] = field(default_factory=dict)
    warnings: list[MgcError] = field(default_factory=list)  # reported by check, plan and run; nothing stops
