"""`moe(base, experts = [a, b], gate = hidden(prompts = ...), experts_per_token = 2)`: a mixture-of-experts
checkpoint from dense models, as mergekit-moe builds it. Attention, norms, embeddings and head are the base's;
expert E of layer L is the MLP of layer L of experts[E]; the routers come from the gate (compiler/moe_gate.py),
computed before the run (mgc.gates) and loaded from their cache folder. moe_config.py has the architectures."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from mgc.core.dtypes import float32
from mgc.core.errors import CheckpointError, MgcWarning, RecipeTypeError, Span
from mgc.grammar import ast

from .call_args import one_argument_and_options
from .gate_cache import GateSpec
from .layers import LayerMap
from .moe_config import ARCHS, MLP, MoeArch, dense_mlp, moe_config, refusal, supported
from .moe_gate import GATE_USAGE, check_gate
from .values import CheckpointModel, ListV, ModelValue, Num, TensorSpec, kind_of

if TYPE_CHECKING:
    from .interpreter import Checker

MOE_PARAMS = ("experts", "gate", "experts_per_token", "shared_expert")
USAGE = 'moe(base, experts = [a, b], gate = hidden(prompts = [["..."], ["..."]]), experts_per_token = 2)'


@dataclass(eq=False)
class MoeModel(ModelValue):
    base: ModelValue
    experts: tuple[ModelValue, ...]
    shared: Optional[ModelValue]
    per_token: int
    intermediate: int
    shared_intermediate: Optional[int]
    gate: GateSpec
    span: Span
    tensors: dict[str, TensorSpec]
    layers: LayerMap
    depth: int
    sources: dict[str, tuple[ModelValue, str]]  # copied tensors: output name -> (model, its tensor name)
    routers: dict[str, str]  # router tensors: output name -> tensor name in the gate's cache folder

    @property
    def config_source(self):
        return self.base.config_source

    def _derive_config(self) -> dict:
        return moe_config(self.base.config(), len(self.experts), self.per_token, self.intermediate,
                          self.shared_intermediate)

    def children(self) -> list[ModelValue]:
        return [self.base, *self.experts] + ([self.shared] if self.shared is not None else [])


def moe(checker: Checker, e: ast.Call, env, stack) -> MoeModel:
    opts = one_argument_and_options("moe", "one model, the base", e, MOE_PARAMS, USAGE)
    base = checker.model_of(e.args[0], env, stack, "moe()'s base")
    config = base.config()
    arch = ARCHS.get(config.get("model_type"))
    if arch is None:
        raise RecipeTypeError(f"moe() has no mixture-of-experts counterpart for a '{config.get('model_type')}' model",
                              e.args[0].span, f"moe() builds from: {supported()}")
    refused = refusal(config)
    if refused is not None:
        raise RecipeTypeError(refused[0], e.args[0].span, refused[1])
    hidden = config.get("hidden_size")
    layers = base.num_layers
    for name in ("experts", "gate"):
        if name not in opts:
            raise RecipeTypeError(f"moe() needs `{name} = ...`", e.span,
                                  f"write {USAGE}" if name == "experts" else f"write {GATE_USAGE}")
    experts = _experts(checker, opts["experts"], env, stack)
    sizes = [_mlp_size(m, span, f"expert {i}", config, layers, hidden) for i, (m, span) in enumerate(experts)]
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            raise RecipeTypeError(
                f"expert {i}'s MLPs have {size} intermediate units, expert 0's {sizes[0]}", experts[i][1],
                "the experts of a mixture share one intermediate size: use fine-tunes of one model",
            )
    shared, shared_size = _shared_expert(checker, opts.get("shared_expert"), arch, e, env, stack, config, layers, hidden)
    per_token = _per_token(checker, opts.get("experts_per_token"), len(experts), env, stack, e.span)
    gate = check_gate(checker, opts["gate"].value, env, stack, base, len(experts), shared is not None, hidden)
    models = [m for m, _ in experts]
    same = {m.checkpoint.path if isinstance(m, CheckpointModel) else id(m) for m in models}
    if len(models) > 1 and len(same) == 1:
        checker.warnings.append(MgcWarning(
            "every expert is the same model: the mixture computes what one expert does, at a greater cost", e.span,
            "give moe() different fine-tunes as experts (this is worth doing only to train the mixture further)",
        ))
    sources, tensors, routers = _tensors(arch, base, models, shared, gate, layers, hidden)
    depth = 1 + max(m.depth for m in [base, *models] + ([shared] if shared is not None else []))
    value = MoeModel(base, tuple(models), shared, per_token, sizes[0], shared_size, gate, e.span, tensors, base.layers,
                     depth, sources, routers)
    return checker.deep_enough(value)


def _experts(checker, kwarg: ast.Kwarg, env, stack) -> list[tuple[ModelValue, Span]]:
    value = checker.eval(kwarg.value, env, stack)
    if not isinstance(value, ListV) or not value.items:
        raise RecipeTypeError(f"moe()'s experts must be a list of one or more models, not "
                              f"{'an empty list' if isinstance(value, ListV) else kind_of(value)}", kwarg.value.span,
                              "write experts = [code, math]")
    nodes = kwarg.value.items if isinstance(kwarg.value, ast.List) else [kwarg.value] * len(value.items)
    found = []
    for item, node in zip(value.items, nodes):
        if not isinstance(item, ModelValue):
            raise RecipeTypeError(f"each of moe()'s experts must be a model, not {kind_of(item)}", node.span)
        found.append((item, node.span))
    return found


def _mlp_size(model: ModelValue, span: Span, what: str, base_config: dict, layers: int, hidden: int) -> int:
    """The intermediate size of a model whose layers' MLPs become experts, after checking it fits the base."""
    model_type = model.config().get("model_type")
    if model_type != base_config.get("model_type"):
        raise RecipeTypeError(f"{what} is a '{model_type}' model and the base a '{base_config.get('model_type')}' one",
                              span, "the experts and the base of a mixture share one architecture")
    if model.num_layers != layers:
        raise RecipeTypeError(f"{what} has {model.num_layers} layers and the base {layers}", span,
                              "each layer's experts are the MLPs of that layer of each expert model")
    size = None
    for layer in range(layers):
        shapes = {}
        for proj in MLP:
            spec = model.tensors.get(dense_mlp(layer, proj))
            if spec is None:
                raise CheckpointError(f"{what} has no tensor '{dense_mlp(layer, proj)}'", span,
                                      "moe() takes each expert's MLP from a dense model")
            shapes[proj] = tuple(spec.shape)
        inner = shapes["gate_proj"][0]
        if shapes["down_proj"][0] != hidden or shapes["gate_proj"][1:] != (hidden,):
            raise RecipeTypeError(f"{what}'s MLPs work on a hidden size of {shapes['down_proj'][0]}, the base's "
                                  f"on {hidden}", span, "the experts must be fine-tunes of the base's model")
        if shapes["up_proj"] != (inner, hidden) or shapes["down_proj"] != (hidden, inner) or inner != (size or inner):
            raise RecipeTypeError(f"{what}'s MLP shapes differ between its own projections or layers", span)
        size = inner
    return size


def _shared_expert(checker, kwarg, arch: MoeArch, e: ast.Call, env, stack, config, layers, hidden):
    if kwarg is None:
        if arch.shared_expert:
            raise RecipeTypeError(f"a {arch.architecture} has a shared expert in every layer: give moe() "
                                  "`shared_expert = m`", e.span, "the shared expert's MLPs are those of model m, "
                                  "often the base")
        return None, None
    if not arch.shared_expert:
        raise RecipeTypeError(f"{arch.architecture} has no shared expert", kwarg.span,
                              "shared_expert is for Qwen2 models (Qwen2-MoE)")
    model = checker.model_of(kwarg.value, env, stack, "moe()'s shared_expert")
    return model, _mlp_size(model, kwarg.value.span, "the shared expert", config, layers, hidden)


def _per_token(checker, kwarg, experts: int, env, stack, call: Span) -> int:
    if kwarg is None:
        value, span = 2, call
    else:
        v = checker.eval(kwarg.value, env, stack)
        if not isinstance(v, Num) or not float(v.value).is_integer():
            raise RecipeTypeError(f"experts_per_token must be a whole number, not "
                                  f"{v.value if isinstance(v, Num) else kind_of(v)}", kwarg.value.span)
        value, span = int(v.value), kwarg.value.span
    if not 1 <= value <= experts:
        raise RecipeTypeError(f"experts_per_token is {value} and moe() has {experts} expert{'s' * (experts != 1)}",
                              span, f"experts_per_token runs from 1 to {experts} (2 unless given)")
    return value


def _tensors(arch: MoeArch, base: ModelValue, experts: list, shared, gate: GateSpec, layers: int, hidden: int):
    sources: dict[str, tuple[ModelValue, str]] = {}
    for name in base.tensors:
        i = base.layers.layer(name)
        if i is None or not name.startswith(f"model.layers.{i}.mlp."):
            sources[name] = (base, name)
    routers: dict[str, str] = {}
    tensors = {}
    for layer in range(layers):
        for proj in MLP:
            for index, expert in enumerate(experts):
                sources[arch.expert(layer, index, proj)] = (expert, dense_mlp(layer, proj))
            if shared is not None:
                sources[arch.shared(layer, proj)] = (shared, dense_mlp(layer, proj))
        routers[arch.router(layer)] = gate.gate_name(layer)
        tensors[arch.router(layer)] = TensorSpec((len(experts), hidden), float32)
        if shared is not None:
            routers[arch.shared_router(layer)] = gate.shared_name(layer)
            tensors[arch.shared_router(layer)] = TensorSpec((1, hidden), float32)
    tensors.update({name: model.tensors[src] for name, (model, src) in sources.items()})
    return sources, tensors, routers
