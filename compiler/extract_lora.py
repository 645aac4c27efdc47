"""`extract_lora(tuned, base = b, rank = 32)`: the difference of two models as a PEFT LoRA adapter, to save.

Its value is an `AdapterValue`, not a model: it cannot be merged further, only saved (compiler/save.py), and its
save is lowered here, one apply node of the internal operation "extract_lora" (stdlib/lora_extract.py) per tensor
of the adapter's layout, written by runtime/adapter_out.py. Each 2-D weight of `targets` (by default, every 2-D
`*.weight` of the layer stacks) gets factors B·A, the best rank-r approximation of tuned − base; every other
tensor is saved whole where it differs from the base (peft's modules_to_save; a target module's bias as peft's
bias = "lora_only" saves it), unless `whole = false`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from mgc.core.errors import CheckpointError, MgcWarning, RecipeNameError, RecipeTypeError, Span
from mgc.grammar import ast
from mgc.stdlib import INTERNAL_OPERATORS
from mgc.stdlib.lora_extract import Params

from .call_args import one_argument_and_options
from .heads import is_vocab_name, layout as vocab_layout
from .ir import Apply, Graph, Save
from .layers import Place, tensor_order
from .params import bind, resolve_all, unmatched_selectors
from .selectors import bind_layers, selector_hint
from .values import Bool, CheckpointModel, ListV, ModelValue, Num, Selector, Str, kind_of

if TYPE_CHECKING:
    from .interpreter import Checker

OP = INTERNAL_OPERATORS["extract_lora"]
NUMERIC = ("rank", "energy", "svd", "oversample", "power_iters")  # bound and resolved per tensor, as for operators
OPTIONS = ("base", "targets", "whole") + NUMERIC
USAGE = "extract_lora(tuned, base = base, rank = 32), or energy = 0.9 instead of (or with) rank"
MODEL_ONLY_SAVE_OPTIONS = ("shard", "tokenizer", "tokens", "pad_to_multiple_of", "chat_template")
# GPT-2's Conv1D modules store their weight [in, out] (peft's fan_in_fan_out)
CONV1D = {"gpt2": ("c_attn", "q_attn", "c_proj", "c_fc")}


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of the adapter: `factors` (lora_A, lora_B of its module), `bias` (of a module with factors, saved
    as peft's bias = "lora_only" does) or `whole` (its module in modules_to_save), the last two where they differ."""

    module: str
    role: str
    shape: tuple[int, ...]  # as stored
    params: Params
    out: int = 0  # of a factors tensor: Δ is [out, in] (transposed from storage for Conv1D)
    inn: int = 0

    @property
    def max_rank(self) -> int:
        return min(self.params.rank or min(self.out, self.inn), self.out, self.inn)


@dataclass
class AdapterLayout:
    tensors: dict[str, AdapterTensor]
    base_name: Optional[str]  # base_model_name_or_path: None for a computed base
    revision: Optional[str]  # a hub base's commit
    tied_embedding: Optional[str]  # of a base that ties its head to it: saved whole, it is the head too

    def describe(self) -> str:
        """What `mgc check` and `mgc plan` say of it."""
        factors = [t for t in self.tensors.values() if t.role == "factors"]
        others = len(self.tensors) - len(factors)
        ranks = sorted({t.params.rank for t in factors if t.params.rank is not None})
        energy = sorted({t.params.energy for t in factors if t.params.energy is not None})
        rank = f"rank {'/'.join(map(str, ranks))}" if ranks else ""
        if energy:
            cap = f" (at most {rank[5:]})" if rank else ""
            rank = f"the rank holding {'/'.join(f'{e:g}' for e in energy)} of ‖Δ‖²{cap}"
        return (f"LoRA adapter: {len(factors)} tensors get factors at {rank}; "
                f"{others} tensors saved whole where they differ from the base")


@dataclass(eq=False)
class AdapterValue:
    """extract_lora()'s value. Like a model for what a save reads (leaves, children, config_source), but no model."""

    tuned: ModelValue
    base: ModelValue
    layout: AdapterLayout
    span: Span
    described_as = "an adapter (extract_lora's value), which can only be saved"
    not_a_model_hint = ("extract_lora() comes last: merge the models first, "
                        "e.g. extract_lora(linear(a, b), base = base, rank = 16)")

    @property
    def config_source(self) -> CheckpointModel:
        return self.tuned.config_source

    @property
    def depth(self) -> int:
        return 1 + max(self.tuned.depth, self.base.depth)

    def children(self) -> list[ModelValue]:
        return [self.tuned, self.base]

    def leaves(self) -> list[CheckpointModel]:
        return list({id(m): m for m in self.tuned.leaves() + self.base.leaves()}.values())


def extract_lora(checker: Checker, e: ast.Call, env, stack) -> AdapterValue:
    opts = one_argument_and_options("extract_lora", "one model, the tuned one", e, OPTIONS, USAGE)
    tuned = checker.model_of(e.args[0], env, stack, "extract_lora()'s tuned model")
    if "base" not in opts:
        raise RecipeTypeError("extract_lora() needs `base = <model>`: the model the adapter applies to", e.span,
                              f"write {USAGE}")
    base = checker.model_of(opts["base"].value, env, stack, "extract_lora()'s base")
    if "rank" not in opts and "energy" not in opts:
        raise RecipeTypeError("extract_lora() needs `rank = ...` or `energy = ...`", e.span, f"write {USAGE}")
    _same_tensors(tuned, base, e.args[0].span, opts["base"].value.span)
    targets = _targets(checker, opts.get("targets"), base, env, stack, e.span)
    whole = _flag(checker, opts.get("whole"), env, stack)
    values = {}
    for name in NUMERIC:
        if name in opts:
            value = checker.eval(opts[name].value, env, stack)
            if isinstance(value, ModelValue):
                raise RecipeTypeError(f"'{name}' cannot be a model", opts[name].value.span)
            if name == "rank":
                _whole_ranks(value)
            values[name] = (bind_layers(value, base.num_layers), opts[name].span)
    bound = bind(OP, values, e.span, 1)
    for name, (value, _) in values.items():
        for selector in unmatched_selectors(value, base.tensors, base.layers):
            raise RecipeNameError(f"selector '{selector}' in '{name}' matches no tensor", selector.span,
                                  selector_hint(selector, base.tensors))
    spans = {k: opts[k].value.span for k in values}
    resolved = resolve_all(OP, bound, spans, e.span, 1, {n: None for n in targets}, base.layers)
    conv1d = CONV1D.get(base.config().get("model_type"), ())
    tensors: dict[str, AdapterTensor] = {}
    for name in targets:
        shape = base.tensors[name].shape
        transpose = name.split(".")[-2] in conv1d
        out, inn = (shape[1], shape[0]) if transpose else shape
        params = resolved[name].model_copy(update={"transpose": transpose})
        if params.rank is not None and params.rank > min(out, inn):
            raise RecipeTypeError(
                f"extract_lora(): rank {params.rank} is more than tensor '{name}' ({out} × {inn}) can have", spans["rank"],
                f"its rank is at most {min(out, inn)}: give a smaller rank, a table with its own entry "
                f'(rank = {{ "{name.rsplit(".", 2)[-2]}": {min(out, inn)}, _: {params.rank} }}), or energy = ...',
            )
        tensors[name] = AdapterTensor(_module(name), "factors", shape, params, out, inn)
    modules = {t.module for t in tensors.values()}
    left = [n for n in base.tensors if n not in tensors]
    if whole:
        for name in left:
            role = "bias" if _module(name) in modules else "whole"
            tensors[name] = AdapterTensor(_module(name), role, base.tensors[name].shape, Params(mode="whole"))
    elif left:
        checker.warnings.append(MgcWarning(
            f"extract_lora(): whole = false: the adapter will not reproduce differences in the {len(left)} tensors "
            f"without factors (e.g. '{left[0]}')", opts["whole"].span,
            "whole = true saves those that differ whole (peft's modules_to_save)",
        ))
    base_name, revision = _base_name(base)
    if base_name is None:
        checker.warnings.append(MgcWarning(
            "extract_lora(): the base is computed, not a checkpoint: the adapter names no base model "
            "(base_model_name_or_path: null) and applies to that computed base", opts["base"].value.span,
            "save the base too, and load the adapter onto it",
        ))
    vocab = vocab_layout(base.tensors)
    tied = vocab.embedding if vocab is not None and vocab.head is None and base.config().get("tie_word_embeddings") else None
    layout = AdapterLayout(dict(sorted(tensors.items(), key=lambda kv: tensor_order(kv[0]))), base_name, revision, tied)
    return AdapterValue(tuned, base, layout, e.span)


def _same_tensors(tuned: ModelValue, base: ModelValue, tuned_span: Span, base_span: Span) -> None:
    for a, b, span, where in ((tuned, base, base_span, "the base"), (base, tuned, tuned_span, "the tuned model")):
        missing = [n for n in a.tensors if n not in b.tensors]
        if missing:
            raise CheckpointError(f"extract_lora(): tensor '{missing[0]}' is missing from {where}", span,
                                  "an adapter holds the difference of two models with the same tensors")
    for name, spec in tuned.tensors.items():
        other = base.tensors[name]
        if spec.shape != other.shape:
            vocab = is_vocab_name(name)
            raise RecipeTypeError(
                f"extract_lora(): tensor '{name}' is {list(spec.shape)} in the tuned model but {list(other.shape)} in "
                "the base" + (": their vocabularies differ" if vocab else ""), tuned_span,
                "an adapter cannot resize embeddings: save the tuned model whole" if vocab else None,
            )
        if not spec.dtype.is_floating_point or not other.dtype.is_floating_point:
            raise RecipeTypeError(f"extract_lora(): tensor '{name}' is {spec.dtype}, not floating point", tuned_span,
                                  "an adapter holds floating-point differences only")


def _targets(checker: Checker, k: Optional[ast.Kwarg], base: ModelValue, env, stack, span: Span) -> list[str]:
    """The tensors that get factors: 2-D floating weights, by default those of the layer stacks."""
    def low_rank(name: str) -> bool:
        spec = base.tensors[name]
        return len(spec.shape) == 2 and spec.dtype.is_floating_point and name.endswith(".weight")

    if k is None:
        found = [n for n in base.tensors if low_rank(n) and isinstance(p := base.layers.place(n), Place) and p.stack]
        if not found:
            raise RecipeTypeError("extract_lora(): the base has no 2-D weights in a layer stack to adapt", span,
                                  'name them: targets = ["q_proj", "v_proj"]')
        return found
    value = checker.eval(k.value, env, stack)
    items = value.items if isinstance(value, ListV) else (value,)
    found: dict[str, None] = {}
    for item in items:
        if not isinstance(item, Str):
            raise RecipeTypeError(f"extract_lora()'s targets are selector strings, not {kind_of(item)}", item.span,
                                  'write targets = ["q_proj", "*.mlp.*"]')
        selector = Selector("pattern", item.value, span=item.span)
        matched = [n for n in base.tensors if selector.matches(n, base.layers)]
        if not matched:
            raise RecipeNameError(f"target '{item.value}' matches no tensor", item.span,
                                  selector_hint(selector, base.tensors))
        vocab = [n for n in matched if is_vocab_name(n)]
        if vocab:
            raise RecipeTypeError(f"target '{item.value}' matches '{vocab[0]}', an embedding or head", item.span,
                                  "embeddings and heads are saved whole (whole = true), not as factors")
        weights = [n for n in matched if low_rank(n)]
        if not weights:
            raise RecipeTypeError(f"target '{item.value}' matches no 2-D weight (e.g. '{matched[0]}')", item.span,
                                  "factors are made for 2-D *.weight tensors; the others are saved whole")
        found.update(dict.fromkeys(weights))
    if not found:
        raise RecipeTypeError("extract_lora()'s targets name no tensor: an adapter needs at least one", k.value.span,
                              'name them: targets = ["q_proj", "v_proj"], or leave targets out for every projection')
    return list(found)


def _whole_ranks(value) -> None:
    """A rank written as a number is a whole number; one read off a gradient is rounded (stdlib/lora_extract.py)."""
    if isinstance(value, Num) and not float(value.value).is_integer():
        raise RecipeTypeError(f"extract_lora()'s rank must be a whole number, not {value.value}", value.span)
    for _, entry in getattr(value, "entries", ()):
        _whole_ranks(entry)


def _flag(checker: Checker, k: Optional[ast.Kwarg], env, stack) -> bool:
    if k is None:
        return True
    value = checker.eval(k.value, env, stack)
    if not isinstance(value, Bool):
        raise RecipeTypeError(f"extract_lora()'s whole must be true or false, not {kind_of(value)}", k.value.span)
    return value.value


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _base_name(base: ModelValue) -> tuple[Optional[str], Optional[str]]:
    if not isinstance(base, CheckpointModel):
        return None, None
    revision = getattr(base.checkpoint, "revision", None)
    if revision is not None:
        return revision.repo_id, revision.sha
    return str(base.checkpoint.path), None


def refuse_model_options(options: dict) -> None:
    """The save options that only a model has."""
    for name in MODEL_ONLY_SAVE_OPTIONS:
        if name in options:
            raise RecipeTypeError(
                f"save option '{name}' is for a model; this save writes a LoRA adapter", options[name].span,
                "an adapter's save takes dtype only: it holds no tokenizer and is one file",
            )


def packed_shape(t: AdapterTensor) -> tuple[int, ...]:
    """The largest result of the tensor's operation (the factors at their largest rank, or the whole tensor)."""
    return (t.max_rank + 1, t.inn + t.out) if t.role == "factors" else (math.prod(t.shape) + 1,)


def lower_adapter(g: Graph, memo: dict, save, lower: Callable) -> None:
    """One extract_lora node per tensor of the layout, over the base's and the tuned model's nodes, and its save."""
    value: AdapterValue = save.model
    for name, t in value.layout.tensors.items():
        inputs = (lower(g, memo, value.base, name), lower(g, memo, value.tuned, name))
        apply = Apply(OP.name, t.params, True, name, t.shape, value.span, seed_tensor=name)
        g.add(Save(save.path, name, packed_shape(t), save.dtype), (g.add(apply, inputs),))
