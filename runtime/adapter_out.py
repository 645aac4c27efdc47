"""The writer of an extract_lora() save: a PEFT LoRA adapter folder, as peft's save_pretrained writes one.

Its tensors' shapes are known only as they are computed (a rank chosen by `energy`, a whole tensor left out where
it equals the base), so each is streamed into a scratch file inside the staging folder and adapter_model.safetensors
(one file, keys sorted, the provenance metadata of runtime/provenance.py in its header) is assembled at close, then
adapter_config.json and README.md, the card with the kept energy of each tensor. Key names are peft's
(get_peft_model_state_dict with the adapter name removed): `base_model.model.<module>.lora_A.weight` and
`lora_B.weight`, `<module>.base_layer.bias` for the bias of a module with factors (bias = "lora_only"), and
`<module>.<param>` for a module in modules_to_save.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mgc.core.dtypes import torch_dtype
from mgc.core.errors import MergeRuntimeError
from mgc.core.safetensors_header import DTYPE_CODES

from .apply import all_finite
from .provenance import CARD_FILE, Provenance, identity

PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
SCRATCH = ".tensors.scratch"
HEAD = "lm_head.weight"  # the output embedding's key in transformers' causal LMs
FACTORS = ("lora_A.weight", "lora_B.weight")
COPY_BLOCK = 16 << 20


@dataclass
class AdapterReport:
    """How much of ‖tuned − base‖² the factors keep, per tensor with factors: (name, rank, ‖Δ‖², kept)."""

    path: Path
    factors: list[tuple[str, int, float, float]] = field(default_factory=list)
    whole: list[str] = field(default_factory=list)  # saved whole, as they differ from the base
    unchanged: int = 0  # whole candidates equal to the base, not written
    energy_mode: bool = False

    @property
    def kept(self) -> float:
        total = sum(f[2] for f in self.factors)
        return sum(f[3] for f in self.factors) / total if total else 1.0

    def worst(self, n: int = 3) -> list[tuple[str, int, float]]:
        rows = [(name, r, kept / total) for name, r, total, kept in self.factors if total]
        return sorted(rows, key=lambda x: x[2])[:n]

    def summary(self) -> str:
        ranks = Counter(r for _, r, _, _ in self.factors)
        shown = ", ".join(f"{r} ×{n}" for r, n in sorted(ranks.items()))
        lines = [f"adapter {self.path}: {len(self.factors)} tensors with factors keep {self.kept:.2%} of ‖tuned − base‖²"
                 + (f" (ranks chosen: {shown})" if self.energy_mode else ""),
                 f"  {len(self.whole)} tensors saved whole, {self.unchanged} equal to the base left out"]
        lines += [f"  {name}: rank {r}, keeps {f:.2%}" for name, r, f in self.worst()]
        return "\n".join(lines)


@dataclass(frozen=True)
class Entry:
    tensor: str
    param: str  # the key's last part: lora_A.weight, lora_B.weight, or the tensor's own (weight, bias)
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: Optional[int]  # in the scratch file; None: zeros
    nbytes: int
    differs: bool = True


class AdapterWriter:
    def __init__(self, out, save, provenance: Provenance):
        self.out, self.save, self.provenance = out, save, provenance
        self.layout = save.adapter
        tensors = self.layout.tensors.values()
        energy = any(t.params.energy is not None for t in tensors if t.role == "factors")
        self.report = AdapterReport(save.path, energy_mode=energy)
        self.factor_of = {t.module: t for t in tensors if t.role == "factors"}
        self.whole_count = Counter(t.module for t in tensors if t.role != "factors")
        self.ranks: dict[str, int] = {}  # module -> rank, of modules with factors
        self.entries: list[Entry] = []
        self.offset = 0
        try:
            self.scratch = open(out.folder / SCRATCH, "wb")
        except OSError as e:
            raise out.error(e) from None

    def write(self, name: str, t: torch.Tensor) -> None:
        spec = self.layout.tensors[name]
        if spec.role != "factors":
            differs = bool(t[-1] != 0)
            if not differs and self.whole_count[spec.module] == 1:  # nothing else of its module can need it
                self.report.unchanged += 1
                return
            self._append(name, name.rsplit(".", 1)[1], self._cast(name, t[:-1].reshape(spec.shape)), differs)
            return
        r = t.shape[0] - 1
        self.report.factors.append((name, r, float(t[r, 0]), float(t[r, 1])))
        if r == 0:
            return
        self.ranks[spec.module] = r
        self._append(name, "lora_A.weight", self._cast(name, t[:r, :spec.inn]))
        self._append(name, "lora_B.weight", self._cast(name, t[:r, spec.inn:].T))

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        cast = t.to(torch_dtype(self.save.dtype)).contiguous()
        if not all_finite(cast):
            raise MergeRuntimeError(f"the adapter's tensor for '{name}' overflows {self.save.dtype} in {self.save.path}",
                                    self.save.span, "save the adapter in a wider dtype: { dtype = fp32 }")
        return cast

    def _append(self, tensor: str, param: str, t: torch.Tensor, differs: bool = True) -> None:
        data = t.reshape(-1).view(torch.uint8).numpy()
        try:
            self.scratch.write(memoryview(data))
        except OSError as e:
            raise self.out.error(e) from None
        self.entries.append(Entry(tensor, param, t.dtype, tuple(t.shape), self.offset, data.nbytes, differs))
        self.offset += data.nbytes

    def close(self) -> AdapterReport:
        try:
            self.scratch.close()
            keys = self._keys()
            self._assemble(keys)
            (self.out.folder / SCRATCH).unlink()
            (self.out.folder / CONFIG_FILE).write_text(json.dumps(self._config(keys), indent=2, sort_keys=True) + "\n")
        except OSError as e:
            raise self.out.error(e) from None
        self.out.write_text(CARD_FILE, card(self.provenance, self.layout, self.report))
        return self.report

    def abort(self) -> None:
        self.scratch.close()

    def _keys(self) -> dict[str, Entry]:
        """The adapter file's key of each entry kept. A module saved whole (modules_to_save) keeps all its tensors,
        as peft loads every one; a bias of a module with factors lives in its base_layer (bias = "lora_only")."""
        changed = {self.layout.tensors[e.tensor].module for e in self.entries if e.param not in FACTORS and e.differs}
        keys = {}
        for e in self.entries:
            spec = self.layout.tensors[e.tensor]
            if e.param in FACTORS:
                keys[f"{PREFIX}{spec.module}.{e.param}"] = e
            elif spec.role == "bias":
                if e.differs:
                    keys[f"{PREFIX}{spec.module}.base_layer.{e.param}"] = e
                    if spec.module not in self.ranks:  # no factors (Δ = 0): zero ones, so that peft has a base_layer
                        keys.update(self._zero_factors(spec.module))
                    self.report.whole.append(e.tensor)
            elif spec.module in changed:
                keys[f"{PREFIX}{spec.module}.{e.param}"] = e
                if e.differs:
                    self.report.whole.append(e.tensor)
            if e.tensor == self.layout.tied_embedding and spec.module in changed:  # ensure_weight_tying: the head too
                keys[f"{PREFIX}{HEAD}"] = e
        self.report.unchanged += sum(1 for e in self.entries if e.param not in FACTORS and not e.differs)
        if not self.ranks and self.factor_of:  # every Δ is 0: peft refuses an adapter that targets no module
            keys.update(self._zero_factors(next(iter(self.factor_of))))
        return dict(sorted(keys.items()))

    def _zero_factors(self, module: str) -> dict[str, Entry]:
        spec = self.factor_of[module]
        self.ranks[module] = 1
        size = self.save.dtype.itemsize
        return {f"{PREFIX}{module}.{p}": Entry(spec.module, p, self.save.dtype, shape, None, size * math.prod(shape))
                for p, shape in (("lora_A.weight", (1, spec.inn)), ("lora_B.weight", (spec.out, 1)))}

    def _assemble(self, keys: dict[str, Entry]) -> None:
        every, first = self.provenance.metadata()
        header: dict = {"__metadata__": {"format": "pt", **every, **first}}
        offset = 0
        for key, e in keys.items():
            header[key] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape),
                           "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.out.folder / WEIGHTS_FILE, "wb") as f, open(self.out.folder / SCRATCH, "rb") as src:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for e in keys.values():
                if e.offset is None:
                    f.write(bytes(e.nbytes))
                    continue
                src.seek(e.offset)
                n = e.nbytes
                while n:
                    block = src.read(min(n, COPY_BLOCK))
                    f.write(block)
                    n -= len(block)

    def _config(self, keys: dict[str, Entry]) -> dict:
        layout, ranks = self.layout, self.ranks
        r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
        # "^" + the escaped name: peft's get_pattern_key matches (.*\.)?(KEY)$, so the key matches this module only
        pattern = {"^" + re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
        saved = sorted({layout.tensors[e.tensor].module for k, e in keys.items()
                        if e.param not in FACTORS and ".base_layer." not in k and not k.endswith(HEAD)})
        transposed = [t.params.transpose for t in self.factor_of.values() if t.module in ranks]
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": layout.base_name,
            "revision": layout.revision, "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "modules_to_save": saved or None,
            "bias": "lora_only" if any(".base_layer." in k for k in keys) else "none",
            "fan_in_fan_out": bool(transposed) and all(transposed), "lora_dropout": 0.0, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "ensure_weight_tying": any(k.endswith(HEAD) for k in keys) and layout.tied_embedding is not None,
        }


def card(provenance: Provenance, layout, report: AdapterReport) -> str:
    lines = ["---"]
    if layout.base_name is not None:
        lines.append(f"base_model: {json.dumps(layout.base_name)}")
    lines += ["library_name: peft", "tags:", "- mgc", "- lora", "---", "", "# LoRA adapter", "",
              f"Extracted with mgc {provenance.version}, the merge-graph compiler: for each adapted tensor, B·A is the "
              "best approximation of tuned − base at its rank (truncated SVD). Load it with "
              "`peft.PeftModel.from_pretrained(base, this_folder)`.", "",
              f"The factors keep {report.kept:.4%} of ‖tuned − base‖²; {len(report.whole)} tensors are saved whole "
              "(modules_to_save).", "", "## Inputs", ""]
    lines += [f"- `{identity(c)}` (headers sha256 `{h}`)" for c, h in zip(provenance.inputs, provenance.hashes)]
    fence = "```"
    while fence in provenance.recipe:
        fence += "`"
    lines += ["", "## Recipe", "", f"`{provenance.recipe_name}`; its relative paths are relative to "
              f"`{provenance.recipe_folder}`.", "", f"{fence}merge", provenance.recipe.rstrip("\n"), fence, "",
              "## Kept energy", "", "| tensor | rank | ‖Δ‖² | kept |", "|---|---:|---:|---:|"]
    for name, r, total, kept in report.factors:
        lines.append(f"| `{name}` | {r} | {total:.4g} | {kept / total if total else 1.0:.4%} |")
    return "\n".join(lines) + "\n"
