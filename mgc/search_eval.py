"""What `mgc search` scores a candidate with: `mgc eval`'s metrics (mgc/evaluate.py) on a fixed split of the data,
step by step so that a trial can be stopped early, and a transformers model that takes each candidate's tensors
in memory.

The data is encoded once with the output's tokenizer and split, with a seeded shuffle, into a search set and a
held-out set. A score is computed over the search set in STEPS equal parts, and the running value after each part
is reported, so a pruner can compare a trial's first parts with the best trial's same parts.
"""
from __future__ import annotations

import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mgc.core.errors import CheckpointError
from mgc.evaluate import TokenStats, encode, kl_sum, pad_id, token_stats
from mgc.lm import DataError, Item, capped_length, read_data, require

METRICS = {"perplexity": "minimize", "accuracy": "maximize", "kl": "minimize"}
STEPS = 4


@dataclass
class Split:
    kind: str  # "text" or "qa"
    search: list[Item]
    holdout: list[Item]


def split_data(path, tokenizer, max_length: int, holdout: float, seed: int) -> Split:
    """The data file encoded and split; the held-out part is `holdout` of the items (at least one when it is
    above 0 and there are two items or more)."""
    data = read_data(path)
    kind, items = encode(tokenizer, data, max_length)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_hold = min(len(items) - 1, max(1, round(holdout * len(items)))) if holdout > 0 and len(items) > 1 else 0
    held = sorted(order[:n_hold])
    rest = sorted(order[n_hold:])
    return Split(kind, [items[i] for i in rest], [items[i] for i in held])


class Scorer:
    """One metric over a list of items, reported in STEPS parts."""

    def __init__(self, metric: str, tokenizer, batch_size: int, teachers: Sequence = ()):
        if metric == "kl" and not teachers:
            raise DataError("--metric kl needs --teachers: the models whose next-token distributions to follow")
        self.metric = metric
        self.direction = METRICS[metric]
        self.pad = pad_id(tokenizer)
        self.batch_size = batch_size
        self.teachers = list(teachers)

    def score(self, model, items: Sequence[Item], report: Optional[Callable[[int, float], None]] = None) -> float:
        parts = _parts(items, STEPS)
        stats, kl, positions = TokenStats(), 0.0, 0
        for step, part in enumerate(parts):
            if self.metric == "kl":
                for teacher in self.teachers:
                    total, count = kl_sum(teacher, model, part, self.batch_size, self.pad)
                    kl += total / len(self.teachers)
                    positions += count / len(self.teachers)
            else:
                s = token_stats(model, part, self.batch_size, self.pad)
                stats.nll += s.nll
                stats.tokens += s.tokens
                stats.correct += s.correct
            value = self._value(stats, kl, positions)
            if report is not None and step < len(parts) - 1:
                report(step, value)
        return value

    def _value(self, s: TokenStats, kl: float, positions: float) -> float:
        if self.metric == "kl":
            return kl / positions if positions else math.nan
        if s.tokens == 0:
            raise DataError("no tokens to score in the search data")
        return math.exp(s.nll / s.tokens) if self.metric == "perplexity" else s.correct / s.tokens


def _parts(items: Sequence[Item], n: int) -> list[list[Item]]:
    n = max(1, min(n, len(items)))
    size = math.ceil(len(items) / n)
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class MemoryModel:
    """A transformers causal LM made once from an output's config.json, whose weights are replaced by each
    candidate's tensors (in float32) without a checkpoint being written."""

    def __init__(self, config: dict, device: torch.device):
        transformers = require("transformers", "mgc search")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            cfg = transformers.AutoConfig.from_pretrained(tmp)
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        except Exception as e:
            raise CheckpointError(f"transformers cannot build the output's model ({cfg.model_type}): {e}") from None
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.tied = {k for k in self.model.state_dict() if _tied(self.model, k)}

    def load(self, tensors: dict[str, torch.Tensor]):
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if k not in self.tied]
        if missing or unexpected:
            shown = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise CheckpointError(f"the merged tensors do not fit the output's model class: {shown}")
        return self.model


def _tied(model, key: str) -> bool:
    """A weight transformers ties to another (the head to the embeddings), which a checkpoint need not hold."""
    out = model.get_output_embeddings()
    return (out is not None and getattr(model.config, "tie_word_embeddings", False)
            and key.endswith("weight") and key.split(".")[0] in {n for n, m in model.named_children() if m is out})


def limit_for(config: dict, max_length: int) -> int:
    """`max_length`, capped at the output's context length, as mgc eval caps it (mgc.lm.context_length)."""
    return capped_length(config.get("max_position_embeddings"), max_length)
