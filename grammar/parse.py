"""Parse .merge text into the AST of mgc.compiler.ast, with a Span on every node."""
from __future__ import annotations

import ast as pyast
from functools import lru_cache
from pathlib import Path
from typing import Optional

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from mgc.compiler import ast
from mgc.compiler.errors import RecipeSyntaxError, Source, Span

GRAMMAR = Path(__file__).with_name("merge.lark")
KEYWORDS = {"def", "save", "to", "with"}


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(GRAMMAR.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse_file(path: str | Path) -> ast.Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeSyntaxError(f"cannot read recipe {path}: {e.strerror or e}") from None
    return parse(text, str(path))


def parse(text: str, name: str = "<recipe>") -> ast.Recipe:
    source = Source(name, text)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    keywords = sorted(tree.scan_values(lambda v: isinstance(v, Token) and v.type == "NAME" and str(v) in KEYWORDS),
                      key=lambda t: (t.line, t.column))
    if keywords:
        raise RecipeSyntaxError(f"'{keywords[0]}' is a keyword and cannot be a name", _span(source, keywords[0]))
    try:
        statements = _ToAst(source).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, RecipeSyntaxError):
            raise e.orig_exc from None
        raise
    return ast.Recipe(tuple(statements), source)


def _span(source: Source, node) -> Span:
    if isinstance(node, Token):
        return Span(source, node.line, node.column, node.end_line, node.end_column)
    return Span(source, node.line, node.column, node.end_line, node.end_column)


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _s(self, meta) -> Span:
        return _span(self.source, meta)

    def start(self, meta, children):
        return children

    # statements
    def assign(self, meta, c):
        name, value = c
        return ast.Assign(str(name), value, self._s(meta), _span(self.source, name))

    def def_(self, meta, c):
        name, *params, body = c
        params = [p for p in params if p is not None]
        seen = set()
        for p in params:
            if str(p) in seen:
                raise RecipeSyntaxError(f"parameter '{p}' appears twice in def {name}", _span(self.source, p))
            seen.add(str(p))
        return ast.Def(str(name), tuple(map(str, params)), body, self._s(meta), _span(self.source, name))

    def save(self, meta, c):
        value, path, options = c
        return ast.Save(value, _unquote(path, self.source), tuple(options or ()), self._s(meta), _span(self.source, path))

    def options(self, meta, c):
        return [o for o in c if o is not None]

    def option(self, meta, c):
        name, value = c
        return ast.Option(str(name), value, _span(self.source, name))

    # expressions
    def number(self, meta, c):
        text = str(c[0])
        value = int(text) if text.lstrip("+-").isdigit() else float(text)
        return ast.Number(value, self._s(meta))

    def string(self, meta, c):
        return ast.String(_unquote(c[0], self.source), self._s(meta))

    def name(self, meta, c):
        return ast.Name(str(c[0]), self._s(meta))

    def list(self, meta, c):
        return ast.List(tuple(x for x in c if x is not None), self._s(meta))

    def table(self, meta, c):
        return ast.Table(tuple(x for x in c if x is not None), self._s(meta))

    def entry(self, meta, c):
        key, value = c
        return ast.Entry(key, value, self._s(meta))

    def key_name(self, meta, c):
        return ast.KeyName(str(c[0]), self._s(meta))

    def key_string(self, meta, c):
        return ast.KeyString(_unquote(c[0], self.source), self._s(meta))

    def key_layers(self, meta, c):
        name, (start, stop) = c
        if str(name) != "layers":
            raise RecipeSyntaxError(
                f"'{name}[...]' is not a selector", _span(self.source, name), "a layer range is written layers[a:b]"
            )
        return ast.KeyLayers(start, stop, self._s(meta))

    def slice(self, meta, c):
        start, stop = c
        return (None if start is None else int(start), None if stop is None else int(stop))

    def call(self, meta, c):
        func, *args = c
        args = [a for a in args if a is not None]
        positional = tuple(a for a in args if not isinstance(a, ast.Kwarg))
        kwargs = tuple(a for a in args if isinstance(a, ast.Kwarg))
        seen_kw = False
        for a in args:
            if isinstance(a, ast.Kwarg):
                seen_kw = True
            elif seen_kw:
                raise RecipeSyntaxError(
                    "positional argument after a keyword argument", a.span, "put the models first, then name = value"
                )
        seen_names = set()
        for k in kwargs:
            if k.name in seen_names:
                raise RecipeSyntaxError(f"parameter '{k.name}' given twice", k.span)
            seen_names.add(k.name)
        return ast.Call(str(func), positional, kwargs, self._s(meta), _span(self.source, func))

    def kwarg(self, meta, c):
        name, value = c
        return ast.Kwarg(str(name), value, _span(self.source, name))

    def layer_slice(self, meta, c):
        value, attr, (start, stop) = c
        if str(attr) != "layers":
            raise RecipeSyntaxError(
                f"models have no attribute '{attr}'", _span(self.source, attr), "the only attribute is .layers[a:b]"
            )
        return ast.LayerSlice(value, start, stop, self._s(meta))

    def with_(self, meta, c):
        value, table = c
        return ast.With(value, table, self._s(meta))



def _unquote(tok: Token, source: Source) -> str:
    try:
        return pyast.literal_eval(str(tok))
    except (SyntaxError, ValueError) as e:
        raise RecipeSyntaxError(
            f"bad escape in string: {e.args[0] if e.args else e}", _span(source, tok),
            "escapes are as in Python strings; write a backslash as \\\\",
        ) from None


_READABLE = {
    "RPAR": "')'", "LPAR": "'('", "RSQB": "']'", "LSQB": "'['", "RBRACE": "'}'", "LBRACE": "'{'",
    "COMMA": "','", "EQUAL": "'='", "COLON": "':'", "DOT": "'.'", "NAME": "a name", "STRING": "a string",
    "SIGNED_NUMBER": "a number", "SIGNED_INT": "an integer", "$END": "end of file",
    "SAVE": "'save'", "TO": "'to'", "DEF": "'def'", "WITH": "'with'",
}


def _describe(terminals) -> str:
    names = sorted({_READABLE.get(t, t) for t in terminals})
    if len(names) > 6:
        names = names[:6] + ["..."]
    return ", ".join(names)


def _token_text(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return repr(str(tok))


def _syntax_error(e: UnexpectedInput, source: Source) -> RecipeSyntaxError:
    hint: Optional[str] = None
    if isinstance(e, UnexpectedToken) and e.token.type != "$END":
        tok = e.token
        span = Span(source, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)
        expected = set(e.expected)
        prev = (e.token_history or [None])[-1]
        if tok.type == "EQUAL" and prev is not None and prev.type in ("SAVE", "DEF", "TO", "WITH"):
            return RecipeSyntaxError(f"'{prev}' is a keyword and cannot be a name", _span(source, prev))
        msg = f"unexpected {_token_text(tok)}; expected {_describe(expected)}"
        if "RPAR" in expected and tok.type in ("NAME", "STRING", "SIGNED_NUMBER"):
            hint = "a ',' or a ')' is missing before this"
        elif tok.type == "EQUAL" and "COLON" in expected:
            hint = "table entries are written key: value"
        elif tok.type == "COLON" and "EQUAL" in expected:
            hint = "parameters and options are written name = value"
        elif tok.type in ("SAVE", "TO", "DEF", "WITH"):
            hint = f"'{tok}' is a keyword"
        elif "EQUAL" in expected and tok.type == "LPAR":
            hint = "a statement is `name = expression`, `def name(params) = expression` or `save expression to \"dir\"`"
    elif isinstance(e, (UnexpectedToken, UnexpectedEOF)):
        lines = source.text.split("\n")
        while len(lines) > 1 and not lines[-1].strip():
            lines.pop()
        line = len(lines)
        col = len(lines[-1].rstrip("\r")) + 1
        span = Span(source, line, col, line, col + 1)
        expected = set(getattr(e, "expected", ()) or ())
        msg = "unexpected end of file" + (f"; expected {_describe(expected)}" if expected else "")
        if "RPAR" in expected:
            hint = "a ')' is missing"
        elif "RBRACE" in expected:
            hint = "a '}' is missing"
        elif "RSQB" in expected:
            hint = "a ']' is missing"
    elif isinstance(e, UnexpectedCharacters):
        span = Span(source, e.line, e.column, e.line, e.column + 1)
        ch = source.text[e.pos_in_stream] if e.pos_in_stream is not None else "?"
        msg = f"unexpected character {ch!r}"
        if ch == "'":
            hint = "strings use double quotes"
        elif ch in "+*/":
            hint = "arithmetic is not part of the language; use linear(...) to weight models"
    else:  # pragma: no cover - lark has no other kinds
        span, msg = None, str(e)
    return RecipeSyntaxError(msg, span, hint)
