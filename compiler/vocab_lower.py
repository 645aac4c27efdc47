"""Lowering a save's vocabulary-indexed tensors (embeddings, head) onto its output vocabulary (compiler/vocab.py).

Each value's tensor is first an `Aligned`: for each output token, which graph node holds its row and where, or
no row at all (a token the value's models lack). A checkpoint's is its load, re-indexed by its row map; nothing
is gathered until an operator needs its inputs row for row. An operator runs once per group of rows that the same
set of its inputs have (usually one group of shared tokens and a few added ones):

- the operator sees only the inputs that have the token, with per-model parameters (weights, density ...) of
  those; where its base lacks the token, the base's row is the mean of those models' rows;
- where fewer models have it than the operator takes (slerp's two), the row is the mean of their rows (one
  model: its row as stored); where only the base has it, the base's row.

The saved tensor is then one `Rows` node: token rows from the merge (or from a `tokens = {...}` model), and every
row no model has, padding included, the mean of the token rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mgc.core.lazy_numpy import np
from pydantic import ValidationError

from mgc.core.errors import RecipeTypeError

from .heads import HeadView
from .ir import Apply, Graph, Rows
from .moe import MoeModel
from .values import CheckpointModel, FisherModel, ModelValue, OpModel, StackModel, TensorSpec, WithModel
from .vocab import sources


@dataclass(frozen=True)
class Aligned:
    nodes: tuple[int, ...]
    source: np.ndarray  # per output token: position in `nodes`, or -1 where the value has no row
    index: np.ndarray  # per output token: the row in that node


def save_tensors(save) -> dict[str, TensorSpec]:
    """The tensors a save writes, in their output shapes."""
    return save.vocab.tensors if getattr(save, "vocab", None) is not None else save.model.tensors


def lower_save_tensor(g: Graph, memo: dict, save, name: str, lower: Callable) -> int:
    vocab = getattr(save, "vocab", None)
    if vocab is None or name not in vocab.names:
        return lower(g, memo, save.model, name)
    low = _Lowering(g, memo, vocab, lower, name, save.model.tensors[name].shape[1:])
    merged = low.aligned(save.model)
    out = _Builder(g, vocab.rows)
    rows = np.nonzero(merged.source >= 0)[0]
    out.take(rows, merged, rows)
    for row, model, token in vocab.overrides:
        chosen = low.aligned(model)
        if chosen.source[row] < 0:
            raise RecipeTypeError(f"the model chosen for token {token!r} has no row for it in '{name}'", model.span,
                                  "choose a model whose vocabulary holds the token")
        out.take(np.array([row]), chosen, np.array([row]))
    return out.build(low.rest, name)


class _Builder:
    """One Rows node under construction."""

    def __init__(self, g: Graph, n: int):
        self.g, self.nodes, self.means = g, [], []
        self.source, self.index = np.full(n, -1, dtype=np.int32), np.zeros(n, dtype=np.int32)

    def _input(self, node: int) -> int:
        if node not in self.nodes:
            self.nodes.append(node)
        return self.nodes.index(node)

    def take(self, out_rows: np.ndarray, a: Aligned, rows: np.ndarray) -> None:
        src = a.source[rows]
        for k in np.unique(src):
            pick = src == k
            self.source[out_rows[pick]] = self._input(a.nodes[k])
            self.index[out_rows[pick]] = a.index[rows][pick]

    def mean(self, out_rows: np.ndarray, terms: list[Aligned], rows: np.ndarray) -> None:
        """Each of `out_rows` is the mean of the same rows (`rows`) of every aligned value in `terms`."""
        columns = []
        for a in terms:
            positions = np.array([self._input(node) for node in a.nodes], dtype=np.int32)
            columns.append((positions[a.source[rows]], a.index[rows]))
        inputs = np.stack([c[0] for c in columns], axis=1)
        keys, which = np.unique(inputs, axis=0, return_inverse=True)
        which = which.reshape(-1)
        for i, key in enumerate(keys):  # one entry per combination of inputs
            pick = np.nonzero(which == i)[0]
            self.means.append((_bytes(out_rows[pick]), tuple((int(k), _bytes(c[1][pick])) for k, c in zip(key, columns))))

    def build(self, rest: tuple[int, ...], name: str) -> int:
        n = len(self.source)
        if len(self.nodes) == 1 and not self.means and (self.source == 0).all():
            node = self.nodes[0]
            if self.g.payload(node).shape[0] == n and (self.index == np.arange(n)).all():
                return node
        node = Rows((n,) + tuple(rest), _bytes(self.source), _bytes(self.index), tuple(self.means), name)
        return self.g.add(node, self.nodes)


def _bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<i4").tobytes()


class _Lowering:
    def __init__(self, g: Graph, memo: dict, vocab, lower: Callable, name: str, rest: tuple[int, ...]):
        self.g, self.memo, self.vocab, self.lower, self.name, self.rest = g, memo, vocab, lower, name, rest
        self.cache = memo.setdefault("vocab", {})
        self.n = vocab.n_tokens

    def aligned(self, model: ModelValue, name: str = None) -> Aligned:
        name = name or self.name
        key = (id(model), name, id(self.vocab))
        if key not in self.cache:
            self.cache[key] = self._aligned(model, name)
        return self.cache[key]

    def _aligned(self, model: ModelValue, name: str) -> Aligned:
        if isinstance(model, (CheckpointModel, FisherModel)):
            ckpt = model.checkpoint if isinstance(model, CheckpointModel) else model.model.checkpoint
            rows = self.vocab.maps[ckpt.path]
            return Aligned((self.lower(self.g, self.memo, model, name),), np.where(rows >= 0, 0, -1), np.maximum(rows, 0))
        if isinstance(model, HeadView):
            return self.aligned(model.value, model.source_name(name))
        if isinstance(model, WithModel):
            return self.aligned(model.source_of(name), name)
        if isinstance(model, (StackModel, MoeModel)):  # a vocabulary tensor of a moe() is the base's
            src, source_name = model.sources[name]
            return self.aligned(src, source_name)
        if isinstance(model, OpModel):
            return self._operator(model, name)
        identity = np.arange(self.n, dtype=np.int32)
        if all(np.array_equal(self.vocab.maps[c.path], identity) for c, _ in sources(model, name)):
            return Aligned((self.lower(self.g, self.memo, model, name),), np.zeros(self.n, dtype=np.int32), identity)
        raise RecipeTypeError(  # a kind of value this module does not know, over differing vocabularies
            f"mgc cannot align the vocabulary of tensor '{name}' through this value", model.span,
            "merge models that share the output's vocabulary here, or align them in a separate save first",
        )

    def _gather(self, a: Aligned, rows: np.ndarray) -> int:
        b = _Builder(self.g, len(rows))
        b.take(np.arange(len(rows)), a, rows)
        return b.build(self.rest, self.name)

    def _mean(self, terms: list[Aligned], rows: np.ndarray) -> int:
        b = _Builder(self.g, len(rows))
        b.mean(np.arange(len(rows)), terms, rows)
        return b.build(self.rest, self.name)

    def _operator(self, model: OpModel, name: str) -> Aligned:
        op, has_base, n = model.op, model.base is not None, len(model.models)
        ins = [self.aligned(m, name) for m in model.inputs]
        aux_names = [k for k in op.model_params if k in model.aux]
        aux = {k: [self.aligned(m, name) for m in model.aux[k]] for k in aux_names}
        present = np.stack([a.source >= 0 for a in ins])
        patterns, group = np.unique(present.T, axis=0, return_inverse=True)
        group = group.reshape(-1)
        out = _Builder(self.g, self.n)
        for g_index, pattern in enumerate(patterns):
            rows = np.nonzero(group == g_index)[0]
            have = [j for j in range(n) if pattern[has_base + j]]
            if not have:
                if has_base and pattern[0]:
                    out.take(rows, ins[0], rows)
                continue
            models = [ins[has_base + j] for j in have]
            if len(have) < op.min_models:
                if len(have) == 1:
                    out.take(rows, models[0], rows)
                else:
                    out.take(rows, _single(self._mean(models, rows), len(rows)), np.arange(len(rows)))
                continue
            inputs = []
            if has_base:
                inputs.append(self._gather(ins[0], rows) if pattern[0] else self._mean(models, rows))
            inputs += [self._gather(a, rows) for a in models]
            for k in aux_names:
                for j in have:
                    if (aux[k][j].source[rows] < 0).any():
                        raise RecipeTypeError(f"{op.name}(): the '{k}' model of model {j + 1} lacks tokens its model has",
                                              model.span)
                    inputs.append(self._gather(aux[k][j], rows))
            params = _subset(op, model.resolved[name], have, n, model.span, len(rows))
            apply = Apply(op.name, params, has_base, name, (len(rows),) + tuple(self.rest), model.span,
                          tuple((k, len(have)) for k in aux_names), seed_tensor=name if op.random else None)
            out.take(rows, _single(self.g.add(apply, inputs), len(rows)), np.arange(len(rows)))
        return Aligned(tuple(out.nodes), out.source, out.index)


def _single(node: int, rows: int) -> Aligned:
    return Aligned((node,), np.zeros(rows, dtype=np.int32), np.arange(rows, dtype=np.int32))


def _subset(op, params, keep: list[int], n: int, span, rows: int):
    """The operator's parameters for the models in `keep` only: each per-model list cut to theirs."""
    if len(keep) == n:
        return params
    data = params.model_dump()
    for field in op.per_model:
        if isinstance(data.get(field), list) and len(data[field]) == n:
            data[field] = [data[field][j] for j in keep]
    try:
        return op.params.model_validate(data)
    except ValidationError as e:
        message = e.errors()[0]["msg"].removeprefix("Value error, ")
        shown = ", ".join(str(j + 1) for j in keep)
        raise RecipeTypeError(
            f"{op.name}(): on the {rows} token rows only models {shown} have, its parameters are invalid: {message}",
            span, "give those tokens' rows from one model with the save's `tokens = {...}` option, or change the weights",
        ) from None
