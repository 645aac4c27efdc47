"""moe()'s router weights ("gates"), described at check time and computed before the run by mgc.gates, like
fisher(): the cache key is known from the base checkpoint's files and the prompts without computing anything.

A cache folder holds config.json, gates.json (what was computed) and model.safetensors with, per layer L,
`layers.L.gate` [experts, hidden] and (with a shared expert) `layers.L.shared_gate` [1, hidden], in float32.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mgc.core.errors import Span

from .fisher_cache import _part, cache_root, fingerprint_checkpoint
from .ir import Load

GATES_VERSION = 1
INFO_FILE = "gates.json"
WEIGHTS_FILE = "model.safetensors"
MODES = ("hidden", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "cheap_embed")


@dataclass(eq=False)
class GateSpec:
    """What one moe()'s routers are computed from. `prompts` has one list per expert, then (with a shared
    expert) one for it; `base` is the checkpoint the prompt modes run (None for the random modes)."""

    mode: str
    prompts: tuple[tuple[str, ...], ...]
    seed: int
    base: Optional[object]  # CheckpointModel
    num_layers: int
    hidden: int
    experts: int
    shared: bool
    span: Span
    files: tuple = ()  # the prompt files read
    negative: tuple[tuple[str, ...], ...] = ()  # negative prompts, one tuple (maybe empty) per routed expert
    key: str = ""
    cache_path: Path = field(default_factory=Path)

    def gate_name(self, layer: int) -> str:
        return f"layers.{layer}.gate"

    def shared_name(self, layer: int) -> str:
        return f"layers.{layer}.shared_gate"

    def describe(self) -> str:
        if self.mode in PROMPT_MODES:
            n = sum(len(p) for p in self.prompts)
            return f"{self.mode}({self.base.checkpoint.path.name}, {n} prompts)"
        return f"{self.mode}(seed = {self.seed})"


def gate_key(spec: GateSpec) -> str:
    """sha256 over the version, mode, shapes and seed, and for the prompt modes the base checkpoint (config,
    tokenizer files, weight fingerprints as fisher_cache's) and every prompt's text."""
    h = hashlib.sha256()
    _part(h, "mgc-gates", str(GATES_VERSION).encode())
    shape = {"mode": spec.mode, "layers": spec.num_layers, "hidden": spec.hidden, "experts": spec.experts,
             "shared": spec.shared}
    if spec.mode in PROMPT_MODES:
        fingerprint_checkpoint(h, Path(spec.base.checkpoint.path))
        shape["prompts"] = [list(p) for p in spec.prompts]
        if spec.negative:
            shape["negative_prompts"] = [list(p) for p in spec.negative]
    else:
        shape["seed"] = spec.seed
    _part(h, "spec", json.dumps(shape, sort_keys=True).encode())
    return h.hexdigest()


def cache_path(key: str) -> Path:
    return cache_root() / "gates" / key


def is_cached(path: Path) -> bool:
    return all((Path(path) / n).is_file() for n in ("config.json", WEIGHTS_FILE, INFO_FILE))


def gates_used(plan) -> list[GateSpec]:
    """The gates whose tensors the plan's graph loads, one per cache folder."""
    gates = getattr(plan.program, "gates", {})
    loaded = {plan.graph.payload(n).checkpoint for n in plan.graph.of_kind(Load)}
    return [g for path, g in gates.items() if path in loaded]


def plan_lines(plan) -> list[str]:
    """Lines for a plan summary: each moe() gate the run needs, cached or to compute."""
    lines = [
        f"  {g.describe()}: {'cached' if is_cached(g.cache_path) else 'to compute'}  [{g.cache_path}]"
        for g in gates_used(plan)
    ]
    return (["", "moe gates:"] + lines) if lines else []
