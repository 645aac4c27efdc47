"""The vocabulary options of a save, checked: `tokenizer = union | base | NAME`, `tokens = { "tok": model, ... }`,
`pad_to_multiple_of = N` and `chat_template = NAME | "jinja text"`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from mgc.core.errors import CheckpointError, RecipeTypeError, Span
from mgc.grammar import ast

from .values import CheckpointModel, ModelValue, Num, Str, kind_of

if TYPE_CHECKING:
    from .interpreter import Checker

MAX_PAD = 1 << 16


@dataclass(frozen=True)
class TokenChoice:
    """`"tok": model` in the tokens option: the rows of token `tok` come from `model`."""

    token: str
    model: ModelValue
    span: Span  # of the token
    model_span: Span


@dataclass(frozen=True)
class VocabOptions:
    mode: str  # "default" (no tokenizer option), "model" (a model's vocabulary) or "union"
    tokenizer: CheckpointModel  # whose tokenizer files are written (union: the base's, with tokens added)
    span: Optional[Span]  # of the tokenizer option's value
    pad: Optional[int] = None
    tokens: tuple[TokenChoice, ...] = ()
    chat_template: Optional[str] = None

    @property
    def reconciles(self) -> bool:
        """The save says how to align vocabularies (a tokenizer option; tokens and padding need one too)."""
        return self.mode != "default" or self.pad is not None or bool(self.tokens)


def vocab_options(checker: Checker, model: ModelValue, opts: dict) -> VocabOptions:
    mode, tokenizer, span = "default", model.config_source, None
    option = opts.get("tokenizer")
    if option is not None:
        v, span = option.value, option.value.span
        if isinstance(v, ast.Name) and v.id in ("union", "base") and not _bound(checker, v.id):
            mode = "union" if v.id == "union" else "model"
        else:
            mode, tokenizer = "model", checker.model_of(v, {}, (), "the tokenizer option").config_source
    return VocabOptions(
        mode, tokenizer, span, _pad(checker, opts.get("pad_to_multiple_of")), _tokens(checker, opts.get("tokens")),
        _template(checker, opts.get("chat_template")),
    )


def _bound(checker: Checker, name: str) -> bool:
    return name in checker.globals or name in checker.poisoned


def _pad(checker: Checker, option: Optional[ast.Option]) -> Optional[int]:
    if option is None:
        return None
    v = checker.eval(option.value, {}, ())
    if isinstance(v, Num) and float(v.value).is_integer() and 1 <= v.value <= MAX_PAD:
        return int(v.value)
    raise RecipeTypeError(
        f"pad_to_multiple_of must be a whole number from 1 to {MAX_PAD}, not "
        + (f"{v.value}" if isinstance(v, Num) else kind_of(v)), option.value.span,
        "the output's vocabulary rows are rounded up to a multiple of it, e.g. pad_to_multiple_of = 64",
    )


def _tokens(checker: Checker, option: Optional[ast.Option]) -> tuple[TokenChoice, ...]:
    if option is None:
        return ()
    if not isinstance(option.value, ast.Table):
        raise RecipeTypeError(
            "tokens must be a table of token -> model", option.value.span,
            'e.g. tokens = { "<|im_start|>": chat, "<|im_end|>": chat }',
        )
    out, seen = [], {}
    for entry in option.value.entries:
        key = entry.key
        token = key.value if isinstance(key, ast.KeyString) else key.name if isinstance(key, ast.KeyName) else None
        if token is None or token == "_" and isinstance(key, ast.KeyName):
            raise RecipeTypeError("a key of tokens must be a token string", key.span, 'e.g. "<|im_start|>": chat')
        if token in seen:
            raise RecipeTypeError(f"token {token!r} is given twice in tokens", key.span, f"the first is at {seen[token]}")
        seen[token] = key.span
        model = checker.model_of(entry.value, {}, (), f"the model for token {token!r}")
        out.append(TokenChoice(token, model, key.span, entry.value.span))
    return tuple(out)


def _template(checker: Checker, option: Optional[ast.Option]) -> Optional[str]:
    if option is None:
        return None
    v = checker.eval(option.value, {}, ())
    if isinstance(v, Str):
        if not v.value.strip():
            raise RecipeTypeError("chat_template is empty", v.span, "give a model's name, or the template's Jinja text")
        return v.value
    if isinstance(v, ModelValue):
        text = chat_template_of(v.config_source.checkpoint, option.value.span)
        if text is None:
            raise CheckpointError(
                f"{v.config_source.checkpoint.path} has no chat template", option.value.span,
                "mgc looks in chat_template.jinja, chat_template.json and tokenizer_config.json",
            )
        return text
    raise RecipeTypeError(
        f"chat_template must be a model or a string of Jinja text, not {kind_of(v)}", option.value.span,
        'e.g. chat_template = chat, or chat_template = "{% for m in messages %}...{% endfor %}"',
    )


def chat_template_of(ckpt, span: Optional[Span]) -> Optional[str]:
    """A checkpoint's chat template: chat_template.jinja, else chat_template.json, else tokenizer_config.json's
    (its default one where it holds several)."""
    path = ckpt.path
    try:
        if (path / "chat_template.jinja").is_file():
            return (path / "chat_template.jinja").read_text()
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (path / name).is_file():
                found = json.loads((path / name).read_text()).get("chat_template")
                if isinstance(found, list):  # named templates
                    found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
                if isinstance(found, str):
                    return found
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read its chat template: {getattr(e, 'strerror', None) or e}", span) from None
    return None
