"""The recipe's built-in functions, model(), ramp(), stack() and fisher(): each checks its own call and returns
its value. BUILTINS is the one table the interpreter calls them through."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from mgc.core.dtypes import float32
from mgc.core.errors import CheckpointError, MgcError, RecipeNameError, RecipeTypeError, Span
from mgc.grammar import ast

from . import fisher_cache
from .call_args import one_argument_and_options
from .heads import vocab_rows_differ
from .inputs import fisher_data
from .layer_kinds import check_layer_kinds
from .extract_lora import extract_lora
from .lora import lora
from .search_space import search
from .moe import moe
from .values import (
    CheckpointModel, FisherModel, LayerRange, ListV, ModelValue, Num, StackModel, Str, TensorSpec, Value, kind_of,
    stack_sources,
)

if TYPE_CHECKING:
    from .interpreter import Checker

FISHER_PARAMS = ("data", "samples", "max_length")


def open_model(checker: Checker, e: ast.Call, env, stack) -> CheckpointModel:
    if len(e.args) != 1 or e.kwargs:
        raise RecipeTypeError("model() takes one argument, the checkpoint folder", e.span)
    arg = checker.eval(e.args[0], env, stack)
    if not isinstance(arg, Str):
        raise RecipeTypeError(f"model() takes a path string, not {kind_of(arg)}", e.args[0].span)
    return checker.inputs.model(arg.value, arg.span, e.span)


def ramp(checker: Checker, e: ast.Call, env, stack) -> ListV:
    if len(e.args) < 2 or e.kwargs:
        raise RecipeTypeError(
            "ramp() takes two or more numbers: the value at the first layer, any in between, and at the last", e.span
        )
    items = tuple(checker.eval(a, env, stack) for a in e.args)
    for item in items:
        if not isinstance(item, Num):
            raise RecipeTypeError(f"ramp() takes numbers, not {kind_of(item)}", item.span)
    return ListV(items, e.span, gradient=True)


def stack_layers(checker: Checker, e: ast.Call, env, stack) -> StackModel:
    if e.kwargs:
        raise RecipeNameError(f"stack() takes no parameters, got '{e.kwargs[0].name}'", e.kwargs[0].span)
    if not e.args:
        raise RecipeTypeError("stack() needs at least one layer range, as stack(a.layers[0:4], b.layers[4:8])", e.span)
    parts = []
    for arg in e.args:
        value = checker.eval(arg, env, stack)
        if isinstance(value, ModelValue):
            require_primary_stack(value, arg.span)
            value = LayerRange(value, 0, value.num_layers, arg.span)
        if not isinstance(value, LayerRange):
            raise RecipeTypeError(f"stack() takes layer ranges like m.layers[0:4], not {kind_of(value)}", arg.span)
        parts.append(value)
    prefix = parts[0].model.layers.primary.prefix
    for part in parts[1:]:
        if part.model.layers.primary.prefix != prefix:
            raise RecipeTypeError(
                f"stack(): this part's layers are named '{part.model.layers.primary.prefix}N' but the first part's "
                f"'{prefix}N'", part.span, "stack() joins layers of one architecture",
            )
    sources = stack_sources(tuple(parts))
    tensors = {}
    for name, (model, src) in sources.items():
        tensors[name] = model.tensors[src]
    _check_stack_shapes(parts)
    check_layer_kinds(parts)
    layers = parts[0].model.layers.with_primary_count(sum(p.stop - p.start for p in parts))
    depth = 1 + max(p.model.depth for p in parts)
    return checker.deep_enough(StackModel(tuple(parts), e.span, tensors, layers, depth, sources))


def fisher(checker: Checker, e: ast.Call, env, stack) -> FisherModel:
    """`fisher(m, data = "file.txt", samples = 64, max_length = 256)`: checked here, computed before the run."""
    usage = 'fisher(m, data = "file.txt", samples = 64, max_length = 256)'
    opts = one_argument_and_options("fisher", "one model", e, FISHER_PARAMS, usage)
    model = checker.model_of(e.args[0], env, stack, "the argument of fisher()")
    if not isinstance(model, CheckpointModel):
        raise RecipeTypeError(
            "fisher() needs a checkpoint model, not a merged or derived one", e.args[0].span,
            'the Fisher is estimated by running a checkpoint with transformers: pass a model("...") value, '
            "or save the merge first and load it with model(...)",
        )
    if "data" not in opts:
        raise RecipeTypeError("fisher() needs `data = \"file.txt\"`: the text it is estimated on", e.span, f"write {usage}")
    data = checker.eval(opts["data"].value, env, stack)
    if not isinstance(data, Str):
        raise RecipeTypeError(f"fisher()'s data must be a path string, not {kind_of(data)}", opts["data"].value.span)
    samples = _count_option(checker, opts.get("samples"), fisher_cache.DEFAULT_SAMPLES, 1, env, stack)
    max_length = _count_option(checker, opts.get("max_length"), fisher_cache.DEFAULT_MAX_LENGTH, 2, env, stack)
    path, info = fisher_data(data.value, checker.base_dir, data.span)
    ckpt = model.checkpoint
    from mgc.core.hub_checkpoint import RemoteCheckpoint

    if isinstance(ckpt, RemoteCheckpoint):  # its weights are not downloaded at check time, and the Fisher needs them
        raise CheckpointError(
            f"fisher() needs a local checkpoint, and {ckpt.label} is on the hub", e.args[0].span,
            f"download it (hf download {ckpt.revision.repo_id} --revision {ckpt.revision.sha} --local-dir DIR) "
            'and write model("DIR")',
        )
    if not ckpt.tokenizer_files():
        raise CheckpointError(
            f"{ckpt.path}: no tokenizer files, which fisher() needs to tokenize the data", e.args[0].span,
        )
    try:
        key = fisher_cache.fisher_key(ckpt.path, path, samples, max_length, data_sha256=info.sha256)
    except OSError as err:
        raise CheckpointError(f"{ckpt.path}: cannot read: {err.strerror or err}", e.args[0].span) from None
    cache = fisher_cache.cache_path(key)
    if not fisher_cache.is_cached(cache) and not fisher_cache.transformers_available():
        raise MgcError(
            "fisher() needs the transformers package to estimate a Fisher that is not cached yet", e.func_span,
            "pip install 'mgc[eval]' (or pip install transformers)",
        )
    tensors = {
        n: TensorSpec(s.shape, float32 if s.dtype.is_floating_point else s.dtype) for n, s in model.tensors.items()
    }
    value = FisherModel(model, path, samples, max_length, key, cache, e.span, tensors, model.layers)
    checker.fishers.setdefault(cache, value)
    return value


def _count_option(checker: Checker, k: Optional[ast.Kwarg], default: int, minimum: int, env, stack) -> int:
    if k is None:
        return default
    v = checker.eval(k.value, env, stack)
    if not isinstance(v, Num) or not float(v.value).is_integer():
        raise RecipeTypeError(f"fisher()'s {k.name} must be a whole number, not {kind_of(v) if not isinstance(v, Num) else v.value}", k.value.span)
    if v.value < minimum:
        raise RecipeTypeError(f"fisher()'s {k.name} must be at least {minimum}, got {int(v.value)}", k.value.span)
    return int(v.value)


def require_primary_stack(model: ModelValue, span: Span) -> None:
    """The one layer stack that `.layers[...]` and stack() slice."""
    if model.layers.primary is None:
        if model.layers.ambiguous:
            shown = ", ".join(f"'{s.prefix}' ({s.count})" for s in model.layers.stacks)
            raise RecipeTypeError(f"the model has several layer stacks ({shown}); mgc cannot tell which one to slice", span)
        raise RecipeTypeError("mgc finds no layer stack in this model's tensor names", span,
                              "layers are tensors named like 'model.layers.N.*' or 'transformer.h.N.*'")


def _check_stack_shapes(parts: list[LayerRange]) -> None:
    first = parts[0].model
    for part in parts[1:]:
        for name, spec in part.model.tensors.items():
            other = first.tensors.get(name)
            # the stack's embeddings and head are the first part's: another part's may have other rows
            if other is not None and other.shape != spec.shape and not vocab_rows_differ(name, other, spec):
                raise RecipeTypeError(
                    f"stack(): tensor '{name}' has shape {list(spec.shape)} here but {list(other.shape)} in the first part",
                    part.span,
                )


Builtin = Callable[["Checker", ast.Call, dict, tuple], Value]
BUILTINS: dict[str, Builtin] = {"model": open_model, "ramp": ramp, "stack": stack_layers, "fisher": fisher, "lora": lora, "moe": moe,
                              "extract_lora": extract_lora, "search": search}
