"""moe()'s architecture table: which dense architectures have a mixture-of-experts counterpart, how their tensors
are named in it, and the MoE config.json derived from the base's config.

Experts are written in the per-expert layout every MoE checkpoint on the hub uses (transformers 5 fuses the
experts into 3-D tensors on load, with its own conversion mapping):

    llama, mistral -> mixtral    model.layers.L.block_sparse_moe.experts.E.{w1,w2,w3}.weight  (gate, down, up)
                                 model.layers.L.block_sparse_moe.gate.weight               [experts, hidden]
    qwen2 -> qwen2_moe           model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight, model.layers.L.mlp.gate.weight,
                                 model.layers.L.mlp.shared_expert.{gate,up,down}_proj.weight,
                                 model.layers.L.mlp.shared_expert_gate.weight              [1, hidden]
    qwen3 -> qwen3_moe           as qwen2_moe, without the shared expert
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoeArch:
    model_type: str
    architecture: str
    experts_key: str  # the config's expert count
    shared_expert: bool  # the MoE class always has one (Qwen2-MoE), or never
    expert_names: dict  # dense MLP projection -> its name inside an expert
    block: str  # the MoE block's name inside a layer

    def expert(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{self.expert_names[proj]}.weight"

    def shared(self, layer: int, proj: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{proj}.weight"

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def shared_router(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


_MIXTRAL = MoeArch("mixtral", "MixtralForCausalLM", "num_local_experts", False,
                   {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}, "block_sparse_moe")
_SAME = {p: p for p in MLP}
ARCHS = {
    "llama": _MIXTRAL,
    "mistral": _MIXTRAL,
    "qwen2": MoeArch("qwen2_moe", "Qwen2MoeForCausalLM", "num_experts", True, _SAME, "mlp"),
    "qwen3": MoeArch("qwen3_moe", "Qwen3MoeForCausalLM", "num_experts", False, _SAME, "mlp"),
}


def supported() -> str:
    return ", ".join(f"{dense} -> {arch.model_type}" for dense, arch in ARCHS.items())


def dense_mlp(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def refusal(config: dict) -> Optional[tuple[str, str]]:
    """(message, hint) when the dense config has something its MoE class cannot represent, else None."""
    model_type = config.get("model_type")
    if ARCHS.get(model_type) is _MIXTRAL:
        for key, what in (("attention_bias", "attention projections"), ("mlp_bias", "MLP projections")):
            if config.get(key):
                return (f"the base has biases on its {what} ({key} = true), which MixtralForCausalLM does not have",
                        "moe() builds Mixtral from Llama or Mistral models without biases")
    return None


def moe_config(base: dict, experts: int, per_token: int, intermediate: int, shared_intermediate: Optional[int]) -> dict:
    """The MoE config.json: the base's config with the MoE class's names and the expert counts; every other
    field (attention, rope, norms, vocabulary, sliding window) is copied, as the attention is the base's."""
    arch = ARCHS[base["model_type"]]
    config = dict(base)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp") if arch is _MIXTRAL else ():
        config.pop(key, None)
    config["model_type"] = arch.model_type
    config["architectures"] = [arch.architecture]
    config[arch.experts_key] = experts
    config["num_experts_per_tok"] = per_token
    config["intermediate_size"] = intermediate
    if arch is not _MIXTRAL:
        config.update(moe_intermediate_size=intermediate, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    if arch.shared_expert:
        config["shared_expert_intermediate_size"] = shared_intermediate
        config["qkv_bias"] = True  # Qwen2's attention always has q, k, v biases
    return config
