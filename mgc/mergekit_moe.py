"""`mgc import` of a mergekit-moe configuration (base_model, experts with positive_prompts, gate_mode): one
`moe(...)` call (docs/moe.md). What moe() cannot express (noise_scale, residual_scale, hidden_avg, several
shared experts) is refused at the YAML's line."""
from __future__ import annotations

import json
from pathlib import Path

from mgc.grammar.format import format_text
from mgc.mergekit_models import Importer, model_ref
from mgc.mergekit_options import DTYPES
from mgc.mergekit_yaml import Y, mapping, refuse, string

MOE_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
GATES = {"hidden": "hidden", "hidden_last": "hidden", "cheap_embed": "cheap_embed", "random": "random",
         "uniform_random": "uniform_random"}


def is_moe(doc: Y) -> bool:
    return isinstance(doc.value, dict) and "experts" in doc.value and "merge_method" not in doc.value


def translate_moe(imp: Importer, doc: Y, config: Path) -> str:
    top = mapping(doc, "a mergekit-moe configuration")
    for k, v in top.items():
        if k not in MOE_KEYS:
            refuse(v, f"unknown mergekit-moe key '{k}'", key=True)
    if "base_model" not in top:
        refuse(doc, "no base_model")
    base = imp.model(model_ref(top["base_model"]))
    mode_y = top.get("gate_mode")
    mode = string(mode_y, "gate_mode") if mode_y is not None else "hidden"  # mergekit's default
    if mode not in GATES:
        refuse(mode_y, f"gate_mode '{mode}' has no moe() counterpart",
               "moe()'s gates: hidden (mergekit's hidden and hidden_last), cheap_embed, random, uniform_random")
    prompted = GATES[mode] in ("hidden", "cheap_embed")
    experts_y = top["experts"]
    if not isinstance(experts_y.value, list) or not experts_y.value:
        refuse(experts_y, "experts must be a list of one or more experts")
    experts = [_expert(imp, e, prompted) for e in experts_y.value]
    args = [base, "experts = [" + ", ".join(m for m, _, _ in experts) + "]"]
    if "experts_per_token" in top:
        n = top["experts_per_token"].value
        if not isinstance(n, int) or isinstance(n, bool):
            refuse(top["experts_per_token"], "experts_per_token must be a whole number")
        args.append(f"experts_per_token = {n}")
    gate_args = []
    shared = top.get("shared_experts")
    if shared is not None and shared.value:
        if not isinstance(shared.value, list) or len(shared.value) != 1:
            refuse(shared, "moe() takes one shared expert (Qwen2-MoE's)")
        model, prompts, _ = _expert(imp, shared.value[0], prompted, negatives=False)
        args.append(f"shared_expert = {model}")
        if prompted:
            gate_args.append(f"shared_prompts = {prompts}")
    if prompted:
        gate_args.insert(0, "prompts = [" + ", ".join(p for _, p, _ in experts) + "]")
        if any(n for _, _, n in experts):
            gate_args.insert(1, "negative_prompts = [" + ", ".join(n or "[]" for _, _, n in experts) + "]")
    else:
        gate_args.append("seed = 0")
        imp.notes.append(f"gate_mode: {mode} (mergekit draws from an unseeded generator; moe() seeds it)")
    args.append(f"gate = {GATES[mode]}({', '.join(gate_args)})")
    if "architecture" in top:
        imp.notes.append(f"architecture: {top['architecture'].value} (moe() chooses it from the base's model_type)")
    opts = ""
    if "dtype" in top and top["dtype"].value is not None:
        d = string(top["dtype"], "dtype")
        if d not in DTYPES:
            refuse(top["dtype"], f"dtype '{d}' is not one mgc writes", "mgc writes bf16, fp16 or fp32")
        opts = f" {{ dtype = {DTYPES[d]} }}"
    lines = [f"# imported from {config.name} (a mergekit-moe configuration) by `mgc import`"]
    lines += [f"# left out, changes no number in mgc: {n}" for n in imp.notes]
    lines += [""] + imp.lines + ["", f"merged = moe({', '.join(args)})", "", f'save merged to "merged"{opts}']
    return format_text("\n".join(lines) + "\n", str(config))


def _expert(imp: Importer, y: Y, prompted: bool, negatives: bool = True) -> tuple[str, str, str]:
    """(the model's variable, its prompts as a recipe list, its negative prompts or "")."""
    f = mapping(y, "an expert")
    for k, v in f.items():
        if k not in EXPERT_KEYS or (k == "negative_prompts" and not negatives and v.value):
            refuse(v, f"unknown key '{k}' in an expert" if k not in EXPERT_KEYS else
                   "negative prompts of a shared expert are not supported", key=True)
        if k in ("noise_scale", "residual_scale") and v.value is not None:
            refuse(v, f"{k} is not supported by moe()", key=True)
    if "source_model" not in f:
        refuse(y, "an expert without source_model")
    model = imp.model(model_ref(f["source_model"]))
    positive, negative = (_prompts(f.get(k)) for k in ("positive_prompts", "negative_prompts"))
    if prompted and not positive:
        refuse(y, "this expert has no positive_prompts, which the gate mode needs (mergekit refuses this too)")
    return model, positive, negative


def _prompts(y) -> str:
    if y is None or not y.value:
        return ""
    if not isinstance(y.value, list) or not all(isinstance(p.value, str) for p in y.value):
        refuse(y, "prompts must be a list of strings")
    return "[" + ", ".join(json.dumps(p.value, ensure_ascii=False) for p in y.value) + "]"
