"""What a PEFT LoRA adapter's files say, read as peft reads them: which features it uses (those mgc cannot
merge exactly are refused by name), each adapted module's rank and α (`rank_pattern`, `alpha_pattern`), and
which base tensor each of its tensors belongs to.

The adapter file decides which modules are adapted: `target_modules` (a list or a regex), `exclude_modules`,
`layers_to_transform` and `layers_pattern` only chose them when the adapter was made, and peft saved exactly
those modules' lora_A and lora_B.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from mgc.core.errors import CheckpointError, Span
from mgc.core.strict_json import json_type

PREFIX = "base_model.model."  # a PeftModel's; an adapter saved through transformers' integration has none
# key suffix -> (factor, an embedding's: lora_embedding_A is [r, vocab] and B [hidden, r])
LORA_PARTS = {
    "lora_A.weight": ("A", False), "lora_B.weight": ("B", False),
    "lora_embedding_A": ("A", True), "lora_embedding_B": ("B", True),
}
# PiSSA, OLoRA, CorDA and LoRA-GA move part of the weights out of the base, LoftQ quantizes it, MiCA is a variant
MOVED_BASE_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "mica")
# config key -> the feature's name, for what makes the merged weights other than W + s·B·A
VARIANTS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "use_qalora": "QALoRA (use_qalora), for quantized bases",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which applies only after its invocation tokens",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}


@dataclass(frozen=True)
class Rank:
    r: int
    factor: float  # α/r, or α/√r with rsLoRA


@dataclass
class Pair:
    """One adapted module's factors: adapter keys, and whether it is an embedding."""

    module: str
    embedding: bool
    a: Optional[str] = None
    b: Optional[str] = None


def check_config(config: dict, where: str, span: Span) -> None:
    """Refuse, by name, what mgc cannot merge exactly; check the types of what it reads."""
    kind = config.get("peft_type")
    if kind != "LORA":
        shown = f"a {kind} adapter" if isinstance(kind, str) else f"peft_type is {json_type(kind)}"
        raise CheckpointError(
            f"{where}: {shown}, not LoRA", span,
            "lora() merges LoRA adapters (peft_type LORA) only; LoHa, LoKr, IA3 and peft's other methods are not supported",
        )
    for key, feature in VARIANTS.items():
        if config.get(key):
            raise CheckpointError(
                f"{where}: the adapter uses {feature}, which mgc does not support", span,
                "lora() merges plain LoRA: W + scale·α/r·B·A on each adapted tensor",
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(MOVED_BASE_INITS):
        raise CheckpointError(
            f"{where}: the adapter was initialised with {init} (init_lora_weights), so it is relative to a base that "
            "initialisation changed, not to the base model", span,
            "save it with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA adapter",
        )
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{where}: unknown bias mode {config.get('bias')!r}", span, "peft's are none, all and lora_only")
    if not _count(config.get("r")):
        raise CheckpointError(f"{where}: r must be a positive whole number, not {config.get('r')!r}", span)
    if not _number(config.get("lora_alpha")):
        raise CheckpointError(f"{where}: lora_alpha must be a number, not {config.get('lora_alpha')!r}", span)
    for key, valid in (("rank_pattern", _count), ("alpha_pattern", _number)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
            raise CheckpointError(f"{where}: {key} must map module names to {'ranks' if key == 'rank_pattern' else 'numbers'}", span)
        for k in pattern:
            try:
                re.compile(k)
            except re.error as e:
                raise CheckpointError(f"{where}: {key} key {k!r} is not a regular expression: {e}", span) from None


def rank_of(config: dict, module: str) -> Rank:
    """A module's rank and factor, as peft's LoraModel sets them when it creates the layer."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(_pattern_key(ranks, module), config["r"])
    alpha = alphas.get(_pattern_key(alphas, module), config["lora_alpha"])
    return Rank(r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def _pattern_key(keys, module: str) -> str:
    """peft.utils.other.get_pattern_key: the first key that matches the end of the module's name."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def layout(keys, where: str, span: Span) -> tuple[dict[str, Pair], dict[str, str]]:
    """The adapted modules (module name -> its pair of keys) and the full tensors the adapter stores (base tensor
    name -> key): modules_to_save, trained biases, and the embeddings peft saves beside embedding LoRA."""
    pairs: dict[str, Pair] = {}
    full: dict[str, str] = {}
    for key in keys:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        part = next(((s, p) for s, p in LORA_PARTS.items() if name.endswith("." + s)), None)
        if part is not None:
            suffix, (factor, embedding) = part
            module = name[: -len(suffix) - 1]
            pair = pairs.setdefault(module, Pair(module, embedding))
            if pair.embedding != embedding:
                raise CheckpointError(f"{where}: module '{module}' has both linear and embedding LoRA tensors", span)
            setattr(pair, factor.lower(), key)
            continue
        if ".lora_" in name or name.startswith("lora_"):
            raise CheckpointError(
                f"{where}: tensor '{key}' is not a LoRA tensor mgc knows", span,
                "mgc reads lora_A.weight, lora_B.weight, lora_embedding_A and lora_embedding_B, with peft's names "
                "(no adapter name in them)",
            )
        if ".original_module." in name:  # modules_to_save's untouched copy of the base module
            continue
        for wrapper in (".base_layer.", ".modules_to_save.default.", ".modules_to_save."):
            name = name.replace(wrapper, ".")
        if name in full:
            raise CheckpointError(f"{where}: tensors '{full[name]}' and '{key}' both replace '{name}'", span)
        full[name] = key
    for pair in pairs.values():
        if pair.a is None or pair.b is None:
            missing = "lora_embedding_" if pair.embedding else "lora_"
            missing += ("A" if pair.a is None else "B") + ("" if pair.embedding else ".weight")
            raise CheckpointError(f"{where}: module '{pair.module}' has no {missing} tensor", span)
    return pairs, full


def _count(v) -> bool:
    return type(v) is int and v > 0


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)
