"""A save's output vocabulary, and how each input's vocabulary-indexed tensors map onto it (by token string).

Where the checkpoints whose embeddings or head reach a save agree on their vocabulary (equal tokenizer files, or
equal tokens by id, and equal row counts), nothing changes: the tensors are merged as stored. Where they differ,
the save must say which vocabulary to write (`tokenizer = union`, `base` or a model), and every such tensor of
every input is then aligned to it row by row before any operator runs (compiler/vocab_lower.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from mgc.core.lazy_numpy import np

from mgc.core.errors import CheckpointError, MgcError, MgcWarning, RecipeTypeError
from mgc.core.paths import relative_to_cwd

from .heads import head_view, is_head_name, is_vocab_name, layout, output_tie, parts_of, require_layout, set_tie_flag
from .layers import TEXT_CONFIGS
from .values import CheckpointModel, ModelValue, TensorSpec
from .vocab_options import VocabOptions, vocab_options
from .vocab_read import fingerprint, read_vocabulary, tokenizers_available

if TYPE_CHECKING:
    from .interpreter import Checker

SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")
SHOWN = 5  # token strings a message lists


@dataclass
class OutputVocab:
    tokenizer: CheckpointModel  # whose tokenizer files are written
    tensors: dict[str, TensorSpec]  # what the save writes, in the output's shapes (a tied head left out)
    names: tuple[str, ...] = ()  # vocabulary-indexed tensors aligned row by row (none: written as merged)
    rows: int = 0
    n_tokens: int = 0  # rows [0, n_tokens) hold tokens; the rest pad (the mean of the token rows)
    maps: dict[Path, np.ndarray] = field(default_factory=dict)  # checkpoint -> its row for each token, or -1
    overrides: tuple[tuple[int, ModelValue, str], ...] = ()  # (row, model, token) from `tokens = {...}`
    added: tuple[dict, ...] = ()  # AddedToken fields of the tokens added to the written tokenizer, in id order
    chat_template: Optional[str] = None
    id_remap: dict[int, Optional[int]] = field(default_factory=dict)  # special token ids of the config's model


def output_vocabulary(checker: Checker, stmt, model: ModelValue, opts: dict, config: dict) -> OutputVocab:
    o = vocab_options(checker, model, opts)
    drop, tied = output_tie(model)
    if tied is not None:
        set_tie_flag(config, tied)
    out = OutputVocab(o.tokenizer, {n: s for n, s in model.tensors.items() if n != drop}, chat_template=o.chat_template)
    names = tuple(n for n in out.tensors if is_vocab_name(n))
    if not names:
        if o.pad or o.tokens:
            require_layout(model, stmt.span, "the save's pad_to_multiple_of and tokens options change vocabulary rows")
        return out
    choices = [(c, _with_names(c, names)) for c in o.tokens]
    reach: dict[Path, tuple[CheckpointModel, int]] = {}
    for m in [model] + [m for _, m in choices]:
        for n in names:
            for ckpt, spec in sources(m, n):  # an embedding and a head of different lengths: the shorter bounds
                reach[ckpt.path] = (ckpt, min(spec.shape[0], reach.get(ckpt.path, (None, spec.shape[0]))[1]))
    everyone = {p: c for p, (c, _) in reach.items()}
    everyone.setdefault(o.tokenizer.checkpoint.path, o.tokenizer.checkpoint)
    rows = {spec.shape[0] for m in [model] + [m for _, m in choices] for n in names for _, spec in sources(m, n)}
    if not rows:  # a kind of value whose tensors come from no checkpoint mgc can see
        if o.pad or o.tokens or o.mode == "union":
            raise RecipeTypeError("mgc cannot tell which checkpoints this save's embeddings come from", stmt.span)
        return out
    vocabs = _vocabularies(everyone, rows, o, stmt)
    if vocabs is None and not (o.pad or o.tokens):  # they agree
        return out
    require_layout(model, stmt.span, "this save aligns its vocabulary")
    if vocabs is None:
        (r,) = rows
        tokens = None
        out.n_tokens, out.rows = r, _round_up(r, o.pad)
        out.maps = {p: np.arange(r, dtype=np.int32) for p in reach}
        if out.rows == r and not o.tokens:
            return out
        vocab = _need(read_vocabulary(o.tokenizer.checkpoint, o.span or stmt.span), o.tokenizer.checkpoint, stmt)
        ids = {t: i for t, i in vocab.ids.items() if i < r}
    else:
        tokens = _output_tokens(o, vocabs, reach, out, stmt)
        ids = {t: i for i, t in enumerate(tokens) if t is not None}
        base_rows = reach.get(o.tokenizer.checkpoint.path, (None, _rows_of(o.tokenizer)))[1] or len(tokens)
        out.n_tokens, out.rows = len(tokens), _round_up(max(len(tokens), base_rows), o.pad)
        out.maps = {p: _row_map(c, r, vocabs[p], tokens, stmt) for p, (c, r) in reach.items()}
        checker.warnings.append(_difference(o, vocabs, reach, tokens, out, stmt))
    out.names = names
    out.overrides = tuple((_token_row(c, ids, o, stmt), m, c.token) for c, m in choices)
    for n in names:
        spec = out.tensors[n]
        out.tensors[n] = TensorSpec((out.rows,) + spec.shape[1:], spec.dtype)
    _update_config(config, out.rows)
    if tokens is not None:
        out.id_remap = _remap_special_ids(config, model.config_source, tokens, stmt)
    return out


def _vocabularies(everyone: dict, rows: set, o: VocabOptions, stmt) -> Optional[dict]:
    """The vocabularies of the checkpoints, by path; None when they agree (also where agreement is all mgc can
    assume: equal row counts and no way to read the tokens, as for checkpoints without tokenizer files)."""
    if len(everyone) == 1 and len(rows) == 1:
        return None
    # the files a checkpoint has, not those in a folder: a hub checkpoint's come from its pinned commit, so
    # every check decides alike whatever the cache holds
    prints = {fingerprint(c, {f.name: f for f in c.tokenizer_files()}) for c in everyone.values()}
    if len(prints) == 1 and len(rows) == 1:
        return None
    assume = len(rows) == 1 and o.mode != "union" and not (o.pad or o.tokens)
    if assume and not tokenizers_available():
        return None
    try:
        vocabs = {p: read_vocabulary(c, o.span or stmt.span) for p, c in everyone.items()}
    except MgcError:
        if assume:
            return None
        raise
    missing = [p for p, v in vocabs.items() if v is None]
    if missing:
        if assume:
            return None
        raise CheckpointError(
            f"{relative_to_cwd(missing[0])} has no tokenizer files, so mgc cannot tell which of its rows is which token",
            o.span or stmt.span, "vocabularies are matched by token string: every model needs its tokenizer",
        )
    if len(rows) == 1 and len({v.tokens for v in vocabs.values()}) == 1:
        return None
    return vocabs


def _output_tokens(o: VocabOptions, vocabs: dict, reach: dict, out: OutputVocab, stmt) -> list:
    if o.mode == "default":
        raise RecipeTypeError(
            "the models merged in this save have different vocabularies: " + _sizes(vocabs, reach), stmt.span,
            "add `tokenizer = union` to the save (every model's tokens, the base's first) or `tokenizer = NAME` "
            "(that model's tokens); `mgc check` then lists the differences",
        )
    tokens = list(vocabs[o.tokenizer.checkpoint.path].tokens)
    if o.mode == "union":
        have, added = set(tokens), []
        for p in reach:
            v = vocabs[p]
            for t in v.tokens:
                if t is not None and t not in have:
                    have.add(t)
                    tokens.append(t)
                    added.append(v.added.get(t) or {"content": t, "special": False, "normalized": True,
                                                    "lstrip": False, "rstrip": False, "single_word": False})
        if added and None in tokens[: len(vocabs[o.tokenizer.checkpoint.path])]:
            raise CheckpointError(
                f"the tokenizer of {_name(o.tokenizer.checkpoint)} has ids without a token, so the tokens a union adds "
                "would not get the ids their rows have", o.span or stmt.span,
                "write one model's vocabulary instead: tokenizer = NAME",
            )
        out.added = tuple(added)
    return tokens


def _row_map(ckpt, rows: int, vocab, tokens: list, stmt) -> np.ndarray:
    found = np.array([vocab.ids.get(t, -1) if t is not None else -1 for t in tokens], dtype=np.int32)
    if found.size and found.max() >= rows:
        i = int(found.max())
        raise CheckpointError(
            f"{relative_to_cwd(ckpt.path)}: its tokenizer has token {vocab.tokens[i]!r} at id {i}, but its embedding "
            f"has only {rows} rows", stmt.span, "the tokenizer and the weights disagree: was resize_token_embeddings forgotten?",
        )
    return found


def _difference(o: VocabOptions, vocabs: dict, reach: dict, tokens: list, out: OutputVocab, stmt) -> MgcWarning:
    what = "the union of them" if o.mode == "union" else f"the vocabulary of {_name(o.tokenizer.checkpoint)}"
    lines = [f"the models merged in this save have different vocabularies; writing {what}: {len(tokens)} tokens in "
             f"{out.rows} rows"]
    outset = set(tokens)
    for p, (c, r) in reach.items():
        v = vocabs[p]
        lacks = [t for t in tokens if t is not None and t not in v.ids]
        extra = [t for t in v.tokens if t is not None and t not in outset]
        line = f"  {_name(c)}: {len(v)} tokens in {r} rows"
        if lacks:
            line += f"; lacks {len(lacks)} of the output's ({_show(lacks)}), and does not vote on their rows"
        if extra:
            line += f"; {len(extra)} of its tokens are dropped ({_show(extra)})"
        lines.append(line)
    nobody = [t for i, t in enumerate(tokens) if t is not None and all(m[i] < 0 for m in out.maps.values())]
    if nobody:
        lines.append(f"  {len(nobody)} tokens are in none of the merged models ({_show(nobody)}): their rows are the "
                     "mean of the token rows")
    return MgcWarning("\n".join(lines), o.span or stmt.span, "docs/vocabularies.md says how each row is merged")


def _sizes(vocabs: dict, reach: dict) -> str:
    return ", ".join(f"{_name(c)}: {len(vocabs[p])} tokens in {r} rows" for p, (c, r) in reach.items())


def _name(ckpt) -> str:
    return getattr(ckpt, "label", None) or relative_to_cwd(ckpt.path)


def _show(tokens: list) -> str:
    return ", ".join(repr(t) for t in tokens[:SHOWN]) + (", ..." if len(tokens) > SHOWN else "")


def _need(vocab, ckpt, stmt):
    if vocab is None:
        raise CheckpointError(f"{_name(ckpt)} has no tokenizer files, which `tokens` needs", stmt.span)
    return vocab


def _token_row(choice, ids: dict, o: VocabOptions, stmt) -> int:
    if choice.token not in ids:
        raise RecipeTypeError(f"token {choice.token!r} is not in the output's vocabulary", choice.span,
                              "tokens names tokens of the vocabulary the save writes (see its tokenizer option)")
    return ids[choice.token]


def _round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _rows_of(model: CheckpointModel) -> Optional[int]:
    lay = layout(model.tensors)
    return model.tensors[lay.embedding].shape[0] if lay is not None else None


def _with_names(choice, names: tuple[str, ...]) -> ModelValue:
    """The model of a `tokens` entry, holding every vocabulary tensor the save writes (a tied one: its head)."""
    m = choice.model
    for n in names:
        if n not in m.tensors and is_head_name(n):
            m = head_view(m, n) or m
        if n not in m.tensors:
            raise CheckpointError(f"the model for token {choice.token!r} has no tensor '{n}'", choice.model_span)
    return m


def sources(model: ModelValue, name: str) -> list[tuple[object, TensorSpec]]:
    """(checkpoint, its tensor's spec) for each checkpoint whose tensor reaches tensor `name` of `model`."""
    if isinstance(model, CheckpointModel):
        return [(model.checkpoint, model.tensors[name])]
    return [found for m, n in parts_of(model, name) for found in sources(m, n)]


def _update_config(config: dict, rows: int) -> None:
    stated = False
    for where in [config] + [config.get(k) for k in TEXT_CONFIGS]:
        if isinstance(where, dict) and "vocab_size" in where:
            where["vocab_size"], stated = rows, True
    if not stated:
        config["vocab_size"] = rows


def _remap_special_ids(config: dict, source: CheckpointModel, tokens: list, stmt) -> dict[int, Optional[int]]:
    """The config's special token ids (bos, eos, pad ...) follow their tokens into the output vocabulary."""
    vocab = read_vocabulary(source.checkpoint, stmt.span)
    if vocab is None or tuple(tokens[: len(vocab)]) == vocab.tokens:
        return {}
    new = {t: i for i, t in enumerate(tokens) if t is not None}
    remap = {i: new.get(t) for i, t in enumerate(vocab.tokens) if t is not None}

    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        return remap.get(v) if isinstance(v, int) and not isinstance(v, bool) and v in remap else v

    for where in [config] + [config.get(k) for k in TEXT_CONFIGS]:
        if isinstance(where, dict):
            for key in SPECIAL_ID_KEYS:
                if key in where:
                    where[key] = fix(where[key])
    return remap
