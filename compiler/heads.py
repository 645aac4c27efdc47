"""Input embeddings and output heads, found from tensor names and config.json (transformers' tied-weight tables
need the model classes, which mgc never loads at check time).

The embedding is the one tensor named like `...embed_tokens.weight`, `...wte.weight`, `...embed_in.weight` or
`...word_embeddings.weight`; its head is `lm_head.weight` (GPT-NeoX: `embed_out.weight`) under one of the
embedding's enclosing prefixes (`lm_head.weight` for `model.embed_tokens.weight`, `language_model.lm_head.weight`
for Llava's `language_model.model.embed_tokens.weight`). A model that stores no head while its config does not
say `tie_word_embeddings: false` is *tied*: its head is its embedding matrix.

A tied model merged with untied ones takes part with its embedding as its head (HeadView). The output is written
tied only where its head is provably its embedding (`same_rows`); otherwise it stores the head and its config says
`tie_word_embeddings: false`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mgc.core.errors import RecipeTypeError, Span

from .layers import TEXT_CONFIGS
from .moe import MoeModel
from .values import CheckpointModel, FisherModel, ModelValue, OpModel, StackModel, TensorSpec, WithModel

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
HEAD_BIASES = ("lm_head.bias",)


def _ends(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def is_head_name(name: str) -> bool:
    return _ends(name, HEAD_NAMES)


def is_vocab_name(name: str) -> bool:
    """A tensor whose rows are indexed by token: an embedding or a head (by its name alone)."""
    return _ends(name, EMBEDDING_SUFFIXES + HEAD_NAMES + HEAD_BIASES)


def vocab_rows_differ(name: str, a: TensorSpec, b: TensorSpec) -> bool:
    """Tensor `name` holds one row per token in both, and only the number of rows differs: the save aligns them."""
    return is_vocab_name(name) and len(a.shape) == len(b.shape) >= 1 and a.shape[1:] == b.shape[1:]


def embedding_names(tensors) -> list[str]:
    return [n for n in tensors if _ends(n, EMBEDDING_SUFFIXES)]


def head_candidates(embedding: str) -> list[str]:
    """Where the head of `embedding` is stored, if it is: a head name under each enclosing prefix."""
    parts = embedding.split(".")
    prefixes = [".".join(parts[:k]) + "." if k else "" for k in range(len(parts) - 1)]
    return [p + h for p in prefixes for h in HEAD_NAMES]


@dataclass(frozen=True)
class Layout:
    """A model's vocabulary-indexed tensors: its embedding, its stored head (None when tied) and head bias."""

    embedding: str
    head: Optional[str]
    bias: Optional[str] = None



def layout(tensors) -> Optional[Layout]:
    """The layout of a model's tensors, or None where mgc finds no single embedding."""
    found = embedding_names(tensors)
    if len(found) != 1:
        return None
    embedding = found[0]
    heads = [h for h in head_candidates(embedding) if h in tensors]
    head = heads[-1] if heads else None
    bias = None
    if head is not None and head.endswith("lm_head.weight") and head[: -len("weight")] + "bias" in tensors:
        bias = head[: -len("weight")] + "bias"
    return Layout(embedding, head, bias)


def tie_flag(config: dict) -> Optional[bool]:
    """`tie_word_embeddings` as config.json states it (top level, else a text sub-config); None if unstated."""
    for where in [config] + [config.get(k) for k in TEXT_CONFIGS]:
        if isinstance(where, dict) and isinstance(where.get("tie_word_embeddings"), bool):
            return where["tie_word_embeddings"]
    return None


def set_tie_flag(config: dict, tied: bool) -> None:
    config["tie_word_embeddings"] = tied
    for key in TEXT_CONFIGS:
        sub = config.get(key)
        if isinstance(sub, dict) and "tie_word_embeddings" in sub:
            sub["tie_word_embeddings"] = tied


@dataclass(eq=False)
class HeadView(ModelValue):
    """A model without a stored head, seen with its embedding as the head `head` (a tied model among untied ones)."""

    value: ModelValue
    head: str
    embedding: str
    span: Span
    tensors: dict
    layers: object
    depth: int

    def source_name(self, name: str) -> str:
        return self.embedding if name == self.head else name

    @property
    def config_source(self) -> CheckpointModel:
        return self.value.config_source

    def _derive_config(self) -> dict:
        return self.value.config()

    def children(self) -> list[ModelValue]:
        return [self.value]


def head_view(model: ModelValue, head: str) -> Optional[HeadView]:
    """`model` with its embedding as head `head`, where it stores no head and is not stated untied."""
    if head in model.tensors:
        return None
    found = [e for e in embedding_names(model.tensors) if head in head_candidates(e)]
    if len(found) != 1 or tie_flag(model.config_source.config()) is False:
        return None
    tensors = dict(model.tensors)
    tensors[head] = model.tensors[found[0]]
    return HeadView(model, head, found[0], model.span, tensors, model.layers, model.depth)


def untie_inputs(models: tuple, base: Optional[ModelValue], aux: dict) -> tuple[tuple, Optional[ModelValue], dict]:
    """An operator's inputs where some store a head and others are tied: the tied ones (and their model-valued
    parameters, such as their Fisher) take part with their embedding as their head."""
    everyone = list(models) + ([base] if base is not None else []) + [m for ms in aux.values() for m in ms]
    heads = {n for m in everyone for n in m.tensors if is_head_name(n)}
    missing = [h for h in sorted(heads) if not all(h in m.tensors for m in everyone)]
    if not missing:
        return models, base, aux

    def fix(m: ModelValue) -> ModelValue:
        for head in missing:
            m = head_view(m, head) or m
        return m

    base = fix(base) if base is not None else None
    return tuple(fix(m) for m in models), base, {k: tuple(fix(m) for m in ms) for k, ms in aux.items()}


def same_rows(model: ModelValue, a: str, b: str) -> bool:
    """Whether tensors `a` and `b` of `model` are provably the same computation on the same data (so the output
    may store one and tie the other to it): what common-subexpression elimination would merge."""
    if a == b:
        return True
    if isinstance(model, HeadView):
        return same_rows(model.value, model.source_name(a), model.source_name(b))
    if isinstance(model, FisherModel):
        return same_rows(model.model, a, b)
    if isinstance(model, WithModel):
        src = model.source_of(a)
        return src is model.source_of(b) and same_rows(src, a, b)
    if isinstance(model, StackModel):
        (ma, na), (mb, nb) = model.sources[a], model.sources[b]
        return ma is mb and same_rows(ma, na, nb)
    if isinstance(model, OpModel):
        folds = [model.op.identity(model.resolved[n], len(model.models), bool(model.aux)) if model.op.identity else None
                 for n in (a, b)]
        if folds[0] is not None and folds[1] is not None and folds[0][0] == folds[1][0]:  # as fold_trivial_ops does
            return same_rows(model.models[folds[0][0]], a, b)
        if model.op.random or model.resolved[a] != model.resolved[b]:
            return False
        others = list(model.inputs) + [m for ms in model.aux.values() for m in ms]
        return all(same_rows(m, a, b) for m in others)
    return False


def parts_of(model: ModelValue, name: str) -> list[tuple[ModelValue, str]]:
    """The values (and their tensor names) that tensor `name` of `model` is read from, one level down."""
    if isinstance(model, HeadView):
        return [(model.value, model.source_name(name))]
    if isinstance(model, FisherModel):
        return [(model.model, name)]
    if isinstance(model, WithModel):
        return [(model.source_of(name), name)]
    if isinstance(model, (StackModel, MoeModel)):  # a moe() router is read from no model
        return [model.sources[name]] if name in model.sources else []
    if isinstance(model, OpModel):
        parts = list(model.inputs) + [m for ms in model.aux.values() for m in ms]
    else:  # a kind of value this module does not know: what it is made of
        parts = model.children()
    return [(m, name) for m in parts if name in m.tensors]


def involves_view(model: ModelValue, name: str) -> bool:
    """Whether tensor `name` of `model` is read, somewhere down, through a HeadView."""
    if isinstance(model, HeadView) and name == model.head:
        return True
    if isinstance(model, (CheckpointModel, FisherModel)):
        return False
    return any(involves_view(m, n) for m, n in parts_of(model, name))


def output_tie(model: ModelValue) -> tuple[Optional[str], Optional[bool]]:
    """(the head to leave out of the output, the output's tie_word_embeddings) where tied inputs took part in the
    head; (None, None) leaves the output as its parts are."""
    lay = layout(model.tensors)
    if lay is None or lay.head is None or not involves_view(model, lay.head):
        return None, None
    if lay.bias is None and same_rows(model, lay.embedding, lay.head):
        return lay.head, True
    return None, False


def require_layout(model: ModelValue, span: Span, why: str) -> Layout:
    lay = layout(model.tensors)
    if lay is None:
        found = embedding_names(model.tensors)
        raise RecipeTypeError(
            f"{why}, but mgc cannot tell which tensor is this model's input embedding "
            + (f"(candidates: {', '.join(found)})" if found else "(no tensor named like '*.embed_tokens.weight')"),
            span, "mgc knows embeddings named *.embed_tokens.weight, *.wte.weight, *.embed_in.weight and "
            "*.word_embeddings.weight, and heads named lm_head.weight or embed_out.weight",
        )
    return lay
