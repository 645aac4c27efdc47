"""`lora("adapter")`: a PEFT LoRA adapter as a model value, its base plus scale·α/r·B·A on each adapted tensor.

The base is the checkpoint adapter_config.json names (`base_model_name_or_path`, opened as model() opens a
path) or the model given as `base = m`. Each adapted tensor is lowered to one apply node of the internal
operation "lora" (stdlib/lora_update.py) over the base tensor's node and loads of lora_A and lora_B from the
adapter file, so the update is computed tensor by tensor while streaming, never for a whole model at once.
The full tensors an adapter stores (modules_to_save, trained biases, the embeddings peft saves beside embedding
LoRA) replace the base's, as peft loads them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from pydantic import ValidationError

from mgc.core import hub
from mgc.core.adapter import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE, Adapter, open_adapter
from mgc.core.errors import CheckpointError, RecipeNameError, RecipeTypeError, Span
from mgc.core.paths import resolve_checkpoint_path, show_path
from mgc.grammar import ast
from mgc.stdlib import INTERNAL_OPERATORS
from mgc.stdlib.lora_update import Params

from .call_args import one_argument_and_options
from .ir import Apply, Graph, Load
from .layers import LayerMap
from .lora_config import Pair, check_config, layout, rank_of
from .params import MISSING, check_value, resolve, unmatched_selectors
from .selectors import bind_layers, selector_hint
from .values import ModelValue, Str, TensorSpec, Value, kind_of

if TYPE_CHECKING:
    from .interpreter import Checker

OPTIONS = ("base", "scale")
OP = INTERNAL_OPERATORS["lora"]


@dataclass(frozen=True)
class Update:
    a: str  # the adapter's keys of the two factors
    b: str
    params: Params


@dataclass(eq=False)
class LoraModel(ModelValue):
    adapter: Adapter
    base: ModelValue
    updates: dict[str, Update]  # base tensor -> its update
    full: dict[str, str]  # base tensor -> the adapter's tensor that replaces it
    span: Span
    tensors: dict[str, TensorSpec]
    layers: LayerMap
    depth: int

    @property
    def config_source(self):
        return self.base.config_source

    def _derive_config(self) -> dict:
        return self.base.config()

    def children(self) -> list[ModelValue]:
        return [self.base]


def lora(checker: Checker, e: ast.Call, env, stack) -> LoraModel:
    usage = 'lora("path/to/adapter"), or lora("path/to/adapter", base = model("..."), scale = 0.5)'
    opts = one_argument_and_options("lora", "one adapter folder", e, OPTIONS, usage)
    arg = checker.eval(e.args[0], env, stack)
    if not isinstance(arg, Str):
        raise RecipeTypeError(f"lora() takes a path string, not {kind_of(arg)}", e.args[0].span, f"write {usage}")
    adapter = _open(checker, arg)
    where = str(adapter.folder)
    check_config(adapter.config, where, arg.span)
    if "base" in opts:
        base = checker.model_of(opts["base"].value, env, stack, "lora()'s base")
    else:
        base = _config_base(checker, adapter, arg, e.span)
    if "quantization_config" in base.config():
        raise CheckpointError(
            "lora(): the base model is quantized (its config.json has quantization_config)", arg.span,
            "mgc merges into floating-point weights: give the unquantized base, base = model(\"...\")",
        )
    scale = _scale_value(checker, opts.get("scale"), base, env, stack)
    pairs, full = layout(adapter.tensors, where, arg.span)
    updates = {}
    for module, pair in pairs.items():
        target = module + ".weight"
        _check_target(adapter, pair.a, target, base, arg.span)
        transpose = _check_shapes(adapter, pair, base.tensors[target].shape, arg.span)
        factor = rank_of(adapter.config, module).factor * _scale_for(scale, target, base.layers)
        try:
            params = Params(scale=factor, transpose=transpose)
        except ValidationError:
            raise RecipeTypeError(f"lora(): the update of '{target}' has the factor {factor}, which is not finite",
                                  opts["scale"].value.span if "scale" in opts else arg.span) from None
        updates[target] = Update(pair.a, pair.b, params)
    for target, key in full.items():
        _check_target(adapter, key, target, base, arg.span)
        info, spec = adapter.tensors[key], base.tensors[target]
        if info.shape != spec.shape or info.dtype.is_floating_point != spec.dtype.is_floating_point:
            raise CheckpointError(
                f"{adapter.path}: tensor '{key}' is {list(info.shape)} {info.dtype} but the base's '{target}' is "
                f"{list(spec.shape)} {spec.dtype}", arg.span,
                "the adapter was made for another base (or a resized vocabulary): give its base, base = model(\"...\")",
            )
    value = LoraModel(adapter, base, updates, full, e.span, dict(base.tensors), base.layers, base.depth + 1)
    return checker.deep_enough(value)


def lower_lora(g: Graph, memo: dict, model: LoraModel, name: str, lower: Callable) -> int:
    """The node of tensor `name` of a lora() value: the base's (or the adapter's replacement), plus its update."""
    def load(key: str) -> int:
        info = model.adapter.tensors[key]
        return g.add(Load(model.adapter.path, key, info.shape, info.dtype))

    replaced = model.full.get(name)
    base = load(replaced) if replaced is not None else lower(g, memo, model.base, name)
    update = model.updates.get(name)
    if update is None:
        return base
    apply = Apply(OP.name, update.params, True, name, model.tensors[name].shape, model.span)
    return g.add(apply, (base, load(update.a), load(update.b)))


def _open(checker: Checker, arg: Str) -> Adapter:
    text, span = arg.value, arg.span
    if text.startswith(hub.PREFIX):
        repo, _, revision = text[len(hub.PREFIX):].partition("@")
        raise CheckpointError(
            "lora() reads a local adapter folder; adapters on the hub are not fetched", span,
            f"download it (hf download {repo}{f' --revision {revision}' if revision else ''} --local-dir DIR) "
            'and write lora("DIR")',
        )
    folder = resolve_checkpoint_path(text, checker.base_dir, span)
    if not os.path.lexists(folder):
        hint = hub.not_found(text, checker.base_dir, span).hint
        raise CheckpointError(f"no LoRA adapter folder at '{show_path(text)}'", span, hint and hint.replace("model(", "lora("))
    for name in (WEIGHTS_FILE, PICKLE_FILE):
        opened = checker.inputs.checkpoints.get(folder / name)
        if isinstance(opened, Adapter):
            return opened
    adapter = open_adapter(folder, checker.inputs.allow_pickle, span)
    return checker.inputs.checkpoints.setdefault(adapter.path, adapter)


def _config_base(checker: Checker, adapter: Adapter, arg: Str, call_span: Span) -> ModelValue:
    text = adapter.config.get("base_model_name_or_path")
    explicit = f'give the base: lora("{arg.value}", base = model("...")'
    if not isinstance(text, str) or not text:
        raise CheckpointError(f"{adapter.folder / CONFIG_FILE}: names no base model (base_model_name_or_path)",
                              arg.span, explicit + ")")
    try:
        return checker.inputs.model(text, arg.span, call_span)
    except CheckpointError as err:
        if hub.HUB_ID.match(text) and not os.path.isabs(text):
            explicit = f'give the base: lora("{arg.value}", base = model("{hub.PREFIX}{text}")'
        raise CheckpointError(
            f"the adapter's base model '{show_path(text)}' (base_model_name_or_path in {CONFIG_FILE}): {err.message}",
            arg.span, (f"{err.hint}; or " if err.hint else "") + explicit + ")",
        ) from None


def _scale_value(checker: Checker, k: Optional[ast.Kwarg], base: ModelValue, env, stack) -> Optional[Value]:
    """`scale = x`: a number, a gradient across the base's layers, or a selector table."""
    if k is None:
        return None
    value = checker.eval(k.value, env, stack)
    if isinstance(value, ModelValue):
        raise RecipeTypeError("lora()'s scale must be a number, not a model", k.value.span, "the base is given as base = ...")
    check_value(value, "scale", False, 1)
    value = bind_layers(value, base.num_layers)
    for selector in unmatched_selectors(value, base.tensors, base.layers):
        raise RecipeNameError(f"selector '{selector}' in 'scale' matches no tensor", selector.span,
                              selector_hint(selector, base.tensors))
    return value


def _scale_for(value: Optional[Value], tensor: str, layers: LayerMap) -> float:
    if value is None:
        return 1.0
    v = resolve(value, tensor, layers, False, 1, "scale")
    if v is MISSING:
        return 1.0
    if type(v) not in (int, float) or not math.isfinite(v):
        raise RecipeTypeError(f"lora()'s scale must be a number, not {v!r} (for tensor '{tensor}')", value.span)
    return float(v)


def _check_target(adapter: Adapter, key: str, target: str, base: ModelValue, span: Span) -> None:
    if target in base.tensors:
        if not base.tensors[target].dtype.is_floating_point:
            raise CheckpointError(f"{adapter.path}: tensor '{key}' adapts '{target}', which the base stores as "
                                  f"{base.tensors[target].dtype}", span, "mgc adds LoRA to floating-point weights only")
        return
    made_for = adapter.config.get("base_model_name_or_path")
    hint = "the adapter was made for a model with other tensor names" + (
        f" ('{show_path(made_for)}', say its {CONFIG_FILE})" if isinstance(made_for, str) and made_for else "")
    if target.split(".")[0] == "lm_head" and base.config().get("tie_word_embeddings"):
        hint = "the base ties its head to its embeddings (tie_word_embeddings) and stores no lm_head.weight"
    raise CheckpointError(f"{adapter.path}: tensor '{key}' belongs to '{target}', which the base model does not have",
                          span, hint)


def _check_shapes(adapter: Adapter, pair: Pair, shape: tuple[int, ...], span: Span) -> bool:
    """Whether the update is transposed: always for an embedding; for a linear weight, peft's fan_in_fan_out,
    which is set for GPT-2's Conv1D ([in, out]) and decided by the shape wherever it is not square."""
    a, b = adapter.tensors[pair.a], adapter.tensors[pair.b]
    if len(a.shape) != 2 or len(b.shape) != 2 or len(shape) != 2:
        raise CheckpointError(
            f"{adapter.path}: tensor '{pair.a}' is {len(a.shape)}-D for a {len(shape)}-D weight", span,
            "mgc merges LoRA on linear and embedding weights (2-D); LoRA on convolutions is not supported",
        )
    r = rank_of(adapter.config, pair.module).r
    if a.shape[0] != r or b.shape[1] != r:
        raise CheckpointError(
            f"{adapter.path}: module '{pair.module}' has rank {a.shape[0]} in '{pair.a}' and {b.shape[1]} in "
            f"'{pair.b}', but {CONFIG_FILE} gives it r = {r}", span, "r, or rank_pattern, must agree with the factors",
        )
    if pair.embedding:
        if shape != (a.shape[1], b.shape[0]):
            raise _shape_error(adapter, pair, (a.shape[1], b.shape[0]), shape, span)
        return True
    straight, transposed = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
    if shape == straight and shape == transposed:
        return bool(adapter.config.get("fan_in_fan_out"))
    if shape in (straight, transposed):
        return shape == transposed
    raise _shape_error(adapter, pair, straight, shape, span)


def _shape_error(adapter: Adapter, pair: Pair, made: tuple, shape: tuple, span: Span) -> CheckpointError:
    return CheckpointError(
        f"{adapter.path}: '{pair.b}' times '{pair.a}' is {list(made)}, but the base's '{pair.module}.weight' is "
        f"{list(shape)}", span, "the adapter was made for another base: give its base, base = model(\"...\")",
    )
