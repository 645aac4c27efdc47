"""Parse .merge text into the AST of mgc.grammar.ast, with a Span on every node."""
from __future__ import annotations

import ast as pyast
import math
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional

from lark import Lark, Token, Transformer_NonRecursive, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from mgc.grammar import ast
from mgc.grammar.parser_cache import cached_parser
from mgc.core.errors import MgcError, RecipeSyntaxError, Source, Span, end_of

GRAMMAR = Path(__file__).with_name("merge.lark")
KEYWORDS = {"def", "save", "to", "with"}
# The checker, lowering and the per-tensor parameter lookups recurse once per level of nesting, so it is
# bounded here (and, summed along chains of def calls, in the checker) far below Python's recursion limit.
MAX_NESTING = ast.MAX_NESTING
INT_RANGE = (-(2**63), 2**63 - 1)


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return cached_parser(GRAMMAR.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse_file(path: str | Path) -> ast.Recipe:
    path = Path(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise RecipeSyntaxError(f"cannot read recipe {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _decode_error(data, e, str(path)) from None
    return parse(text, str(path))


def _decode_error(data: bytes, e: UnicodeDecodeError, name: str) -> RecipeSyntaxError:
    """Where the first byte that is not UTF-8 is, as a line and column of the text before it."""
    before = data[:e.start].decode("utf-8")  # all valid: e.start is the first bad byte
    line = before.count("\n") + 1
    col = len(before) - (before.rfind("\n") + 1) + 1
    source = Source(name, data.decode("utf-8", errors="replace"))  # the bad byte shows as U+FFFD at col
    return RecipeSyntaxError(
        f"the recipe is not UTF-8 text: byte 0x{data[e.start]:02x} cannot be decoded", Span(source, line, col, line, col + 1),
        "save the recipe as UTF-8",
    )


def parse(text: str, name: str = "<recipe>") -> ast.Recipe:
    source = Source(name, text)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    _check_keywords(tree, source)
    try:
        statements = _ToAst(source).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, MgcError):
            raise e.orig_exc from None
        raise
    _check_nesting(statements)
    return ast.Recipe(tuple(statements), source)


def _check_keywords(tree: Tree, source: Source) -> None:
    """Names that are keywords (walked iteratively: the tree may be nested deeply)."""
    keywords: list[Token] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, Token):
            if node.type == "NAME" and str(node) in KEYWORDS:
                keywords.append(node)
        elif isinstance(node, Tree):
            todo.extend(node.children)
    if keywords:
        first = min(keywords, key=lambda t: (t.line, t.column))
        raise RecipeSyntaxError(f"'{first}' is a keyword and cannot be a name", _span(source, first))


def _check_nesting(statements) -> None:
    """Nesting deeper than MAX_NESTING, reported at the first node past it."""
    found = []
    for stmt in statements:
        exprs = [stmt.body] if isinstance(stmt, ast.Def) else [stmt.value] + [o.value for o in getattr(stmt, "options", ())]
        found += [x for x in map(ast.too_deep, exprs) if x is not None]
    if found:
        node = min(found, key=lambda x: (x.span.line, x.span.col))
        span = node.table.span if isinstance(node, ast.With) else node.span  # a `with`: at its `{`
        raise RecipeSyntaxError(
            f"nested too deeply: more than {MAX_NESTING} levels of calls, lists, tables and `with`",
            Span(span.source, span.line, span.col, span.line, span.col + 1), "name the inner parts: `x = ...`, then use x",
        )


def _span(source: Source, node) -> Span:
    if isinstance(node, Token):
        return Span(source, node.line, node.column, node.end_line, node.end_column)
    return Span(source, node.line, node.column, node.end_line, node.end_column)


@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):
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
        tok = c[0]
        if str(tok).lstrip("+-").isdigit():
            value = _int(tok, self.source)
        else:
            value = float(tok)
            if not math.isfinite(value):
                raise _out_of_range(tok, self.source)
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
        return (None if start is None else _int(start, self.source), None if stop is None else _int(stop, self.source))

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



def _int(tok: Token, source: Source) -> int:
    digits = str(tok).lstrip("+-").lstrip("0") or "0"
    if len(digits) > 19:  # before int(): thousands of digits are slow and past Python's conversion limit
        raise _out_of_range(tok, source)
    value = -int(digits) if str(tok).startswith("-") else int(digits)
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise _out_of_range(tok, source)
    return value


def _out_of_range(tok: Token, source: Source) -> RecipeSyntaxError:
    return RecipeSyntaxError(
        "number out of range", _span(source, tok),
        "numbers must be finite, and whole numbers lie between -2**63 and 2**63 - 1",
    )


def _unquote(tok: Token, source: Source) -> str:
    if "\0" in tok:
        raise RecipeSyntaxError("a string cannot hold a NUL character", _span(source, tok))
    try:
        with warnings.catch_warnings():  # an unknown escape such as "\d" stays as written, without a warning
            warnings.simplefilter("ignore")
            value = pyast.literal_eval(str(tok))
    except (SyntaxError, ValueError) as e:
        raise RecipeSyntaxError(
            f"bad escape in string: {e.args[0] if e.args else e}", _span(source, tok),
            "escapes are as in Python strings; write a backslash as \\\\",
        ) from None
    if "\0" in value:  # no path, tensor name or option holds one, and the OS refuses it in paths
        raise RecipeSyntaxError("a string cannot hold a NUL character", _span(source, tok))
    return value


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


_CLOSERS = {"(": "RPAR", "[": "RSQB", "{": "RBRACE"}


def _innermost_open(text: str, end: int) -> Optional[str]:
    """The innermost bracket still open before offset `end` (strings and comments skipped), or None.
    lark's expected set merges the states of every bracket, so the hint and the list come from this."""
    stack: list[str] = []
    i = 0
    while i < end:
        ch = text[i]
        if ch == '"':
            i += 1
            while i < end and text[i] not in '"\n':
                i += 2 if text[i] == "\\" else 1
        elif ch == "#":
            while i < end and text[i] != "\n":
                i += 1
        elif ch in _CLOSERS:
            stack.append(ch)
        elif ch in ")]}" and stack:
            stack.pop()
        i += 1
    return stack[-1] if stack else None


def _matching_closer(expected: set, opener: Optional[str]) -> set:
    """`expected` without the closers of brackets other than the innermost open one."""
    if opener is None:
        return expected
    return {t for t in expected if t not in _CLOSERS.values() or t == _CLOSERS[opener]}


def _token_text(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return repr(str(tok))


def _syntax_error(e: UnexpectedInput, source: Source) -> RecipeSyntaxError:
    hint: Optional[str] = None
    if isinstance(e, UnexpectedToken) and e.token.type != "$END":
        tok = e.token
        span = Span(source, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)
        opener = _innermost_open(source.text, tok.start_pos)
        expected = _matching_closer(set(e.expected), opener)
        prev = (e.token_history or [None])[-1]
        if tok.type == "EQUAL" and prev is not None and prev.type in ("SAVE", "DEF", "TO", "WITH"):
            return RecipeSyntaxError(f"'{prev}' is a keyword and cannot be a name", _span(source, prev))
        msg = f"unexpected {_token_text(tok)}; expected {_describe(expected)}"
        closer = next((t for t in ("RPAR", "RSQB", "RBRACE") if t in expected), None)
        if closer and tok.type in ("NAME", "STRING", "SIGNED_NUMBER"):
            hint = f"a ',' or a {_READABLE[closer]} is missing before this"
        elif tok.type == "EQUAL" and "COLON" in expected:
            hint = "table entries are written key: value"
        elif tok.type == "COLON" and "EQUAL" in expected:
            hint = "parameters and options are written name = value"
        elif tok.type in ("SAVE", "TO", "DEF", "WITH"):
            hint = f"'{tok}' is a keyword"
        elif "EQUAL" in expected and tok.type == "LPAR":
            hint = "a statement is `name = expression`, `def name(params) = expression` or `save expression to \"dir\"`"
    elif isinstance(e, (UnexpectedToken, UnexpectedEOF)):
        span = end_of(source)
        opener = _innermost_open(source.text, len(source.text))
        expected = _matching_closer(set(getattr(e, "expected", ()) or ()), opener)
        msg = "unexpected end of file" + (f"; expected {_describe(expected)}" if expected else "")
        closer = next((t for t in ("RPAR", "RBRACE", "RSQB") if t in expected), None)
        if closer:
            hint = f"a {_READABLE[closer]} is missing"
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
