"""The .merge parser: every construct of the language, the AST it builds (with spans), and
the syntax errors it reports, each at an exact line:col and rendered like a compiler's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mgc.grammar import ast
from mgc.core.errors import MgcError, RecipeSyntaxError
from mgc.grammar import parse, parse_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXAMPLES = sorted((ROOT / "examples").glob("*.merge"))
NAME = "r.merge"


# --- helpers ---------------------------------------------------------------------------------


def statements(text: str) -> tuple:
    return parse(text, NAME).statements


def expr(text: str):
    """The value of the single statement `x = <text>`."""
    (stmt,) = statements(f"x = {text}\n")
    assert isinstance(stmt, ast.Assign) and stmt.name == "x"
    return stmt.value


def where(span) -> tuple[int, int, int, int]:
    return (span.line, span.col, span.end_line, span.end_col)


def syntax_error(text: str) -> RecipeSyntaxError:
    with pytest.raises(RecipeSyntaxError) as info:
        parse(text, NAME)
    return info.value


def assert_syntax_error(text: str, line: int, col: int, message: str, hint: str | None = None, width: int = 1):
    """The error renders as `r.merge:LINE:COL: error: ...`, the source line, carets under the span, the hint."""
    err = syntax_error(text)
    rendered = err.render().split("\n")
    head = f"{NAME}:{line}:{col}: error: "
    assert rendered[0].startswith(head), rendered[0]
    assert message in rendered[0][len(head):], rendered[0]
    assert rendered[1] == "    " + text.split("\n")[line - 1]
    assert rendered[2] == "    " + " " * (col - 1) + "^" * width
    if hint is None:
        assert len(rendered) == 3, err.render()
    else:
        assert rendered[3] == f"hint: {hint}"
    assert str(err) == err.render()
    return err


def dump(node) -> str:
    """A compact, readable rendering of an AST, for golden comparisons."""
    if isinstance(node, ast.Number):
        return repr(node.value)
    if isinstance(node, ast.String):
        return json.dumps(node.value)
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.List):
        return "[" + ", ".join(map(dump, node.items)) + "]"
    if isinstance(node, ast.Table):
        return "{" + ", ".join(f"{dump(e.key)}: {dump(e.value)}" for e in node.entries) + "}"
    if isinstance(node, ast.KeyName):
        return node.name
    if isinstance(node, ast.KeyString):
        return json.dumps(node.value)
    if isinstance(node, (ast.KeyLayers, ast.LayerSlice)):
        bounds = f"[{'' if node.start is None else node.start}:{'' if node.stop is None else node.stop}]"
        return ("layers" if isinstance(node, ast.KeyLayers) else f"{dump(node.value)}.layers") + bounds
    if isinstance(node, ast.Call):
        args = [dump(a) for a in node.args] + [f"{k.name}={dump(k.value)}" for k in node.kwargs]
        return f"{node.func}({', '.join(args)})"
    if isinstance(node, ast.With):
        return f"({dump(node.value)} with {dump(node.table)})"
    span = "{}:{}-{}:{} ".format(*where(node.span))
    if isinstance(node, ast.Assign):
        return f"{span}{node.name} = {dump(node.value)}"
    if isinstance(node, ast.Def):
        return f"{span}def {node.name}({', '.join(node.params)}) = {dump(node.body)}"
    if isinstance(node, ast.Save):
        opts = ", ".join(f"{o.name}={dump(o.value)}" for o in node.options)
        return f"{span}save {dump(node.value)} to {json.dumps(node.path)} {{{opts}}}"
    raise TypeError(node)


# --- statements ------------------------------------------------------------------------------


def test_assignment_of_a_model():
    (stmt,) = statements('base = model("examples/models/base")\n')
    assert isinstance(stmt, ast.Assign)
    assert stmt.name == "base"
    call = stmt.value
    assert isinstance(call, ast.Call) and call.func == "model" and call.kwargs == ()
    (path,) = call.args
    assert isinstance(path, ast.String) and path.value == "examples/models/base"
    assert where(stmt.span) == (1, 1, 1, 37)
    assert where(stmt.name_span) == (1, 1, 1, 5)
    assert where(call.span) == (1, 8, 1, 37)
    assert where(call.func_span) == (1, 8, 1, 13)
    assert where(path.span) == (1, 14, 1, 36)


def test_nested_calls_with_positional_and_keyword_args():
    call = expr("slerp(base, karcher(code, math, weights = [2, 1]), t = 0.5)")
    assert isinstance(call, ast.Call) and call.func == "slerp"
    assert [type(a) for a in call.args] == [ast.Name, ast.Call]
    assert call.args[0].id == "base"
    inner = call.args[1]
    assert inner.func == "karcher" and [a.id for a in inner.args] == ["code", "math"]
    assert [(k.name, dump(k.value)) for k in inner.kwargs] == [("weights", "[2, 1]")]
    (t,) = call.kwargs
    assert isinstance(t, ast.Kwarg) and t.name == "t" and t.value == ast.Number(0.5, t.value.span)
    # a keyword argument's span is that of its name; its value keeps its own
    assert where(t.span) == (1, 56, 1, 57)
    assert where(t.value.span) == (1, 60, 1, 63)
    assert where(inner.span) == (1, 17, 1, 54)


def test_call_with_no_args_and_trailing_comma():
    assert dump(expr("f()")) == "f()"
    assert dump(expr("f(a, b,)")) == "f(a, b)"
    assert dump(expr("f(a, k = 1,)")) == "f(a, k=1)"
    assert dump(expr("(f(a))")) == "f(a)"


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", 0), ("42", 42), ("-3", -3), ("+3", 3), ("007", 7),
        ("3.5", 3.5), ("-0.25", -0.25), (".5", 0.5), ("2.", 2.0),
        ("1e-5", 1e-5), ("-2.5E+3", -2500.0), ("1e5", 100000.0),
    ],
)
def test_numbers(text, value):
    number = expr(text)
    assert isinstance(number, ast.Number)
    assert number.value == value
    assert type(number.value) is type(value)  # integers stay int, the rest are float
    assert where(number.span) == (1, 5, 1, 5 + len(text))


@pytest.mark.parametrize(
    "text, value",
    [
        (r'""', ""),
        (r'"examples/models/base"', "examples/models/base"),
        (r'"say \"hi\""', 'say "hi"'),
        (r'"back\\slash"', "back\\slash"),
        (r'"tab\there\nnewline"', "tab\there\nnewline"),
        (r'"\u00e9t\u00e9"', "été"),
        ('"été"', "été"),
        ('"# not a comment"', "# not a comment"),
        ('"{not: a table}"', "{not: a table}"),
    ],
)
def test_strings_with_escapes(text, value):
    string = expr(text)
    assert isinstance(string, ast.String)
    assert string.value == value
    assert where(string.span) == (1, 5, 1, 5 + len(text))


def test_lists():
    assert expr("[]").items == ()
    assert dump(expr("[1]")) == "[1]"
    assert dump(expr("[1, 2,]")) == "[1, 2]"
    assert dump(expr("[0, 0.5, -1e-3]")) == "[0, 0.5, -0.001]"
    assert dump(expr("[[0, 1], 1, {mlp: 2, _: 3}]")) == "[[0, 1], 1, {mlp: 2, _: 3}]"
    wrapped = expr("[\n  1,  # one\n  2,  # two\n]")
    assert dump(wrapped) == "[1, 2]"
    assert where(wrapped.span) == (1, 5, 4, 2)
    assert where(wrapped.items[1].span) == (3, 3, 3, 4)


def test_ramp_is_a_call():
    ramp = expr("ramp(0.3, 0.7)")
    assert isinstance(ramp, ast.Call) and ramp.func == "ramp"
    assert [a.value for a in ramp.args] == [0.3, 0.7]


def test_selector_tables():
    table = expr('{self_attn: 1, "mlp.up_proj": 2, "*.mlp.*": 3, layers[0:2]: 4, layers[:2]: 5, layers[4:]: 6, '
                 'layers[-2:]: 7, layers[:]: 8, _: 9,}')
    assert isinstance(table, ast.Table)
    keys = [e.key for e in table.entries]
    assert [type(k) for k in keys] == [
        ast.KeyName, ast.KeyString, ast.KeyString, ast.KeyLayers, ast.KeyLayers, ast.KeyLayers, ast.KeyLayers,
        ast.KeyLayers, ast.KeyName,
    ]
    assert keys[0].name == "self_attn"
    assert keys[1].value == "mlp.up_proj"
    assert keys[2].value == "*.mlp.*"
    assert [(k.start, k.stop) for k in keys[3:8]] == [(0, 2), (None, 2), (4, None), (-2, None), (None, None)]
    assert keys[8].name == "_"
    assert [e.value.value for e in table.entries] == list(range(1, 10))
    # spans: the key, the entry (key to value) and the whole table
    assert where(keys[3].span) == (1, 52, 1, 63)
    assert where(table.entries[3].span) == (1, 52, 1, 66)
    assert where(table.span)[:2] == (1, 5)


def test_empty_table_and_the_bare_word_layers_as_a_key():
    assert expr("{}").entries == ()
    (entry,) = expr("{layers: 1}").entries
    assert entry.key == ast.KeyName("layers", entry.key.span)


def test_with():
    w = expr('base with {mlp: code, "model.norm.weight": math}')
    assert isinstance(w, ast.With)
    assert w.value == ast.Name("base", w.value.span)
    assert dump(w.table) == '{mlp: code, "model.norm.weight": math}'
    assert where(w.span) == (1, 5, 1, 53)


def test_chained_with_associates_to_the_left():
    w = expr("a with {mlp: b} with {_: c}")
    assert dump(w) == "((a with {mlp: b}) with {_: c})"
    assert isinstance(w.value, ast.With)
    assert where(w.value.span) == (1, 5, 1, 20)
    assert where(w.span) == (1, 5, 1, 32)
    assert dump(expr("(a with {mlp: b}) with {_: c}")) == dump(w)
    assert dump(expr("slerp(a, b, t = 0.5) with {layers[0:2]: a}")) == "(slerp(a, b, t=0.5) with {layers[0:2]: a})"


def test_layer_slices_in_stack():
    call = expr("stack(base.layers[0:6], code.layers[2:8], m.layers[:2], m.layers[4:], m.layers[-2:])")
    assert call.func == "stack"
    assert all(isinstance(a, ast.LayerSlice) for a in call.args)
    assert [(a.value.id, a.start, a.stop) for a in call.args] == [
        ("base", 0, 6), ("code", 2, 8), ("m", None, 2), ("m", 4, None), ("m", -2, None),
    ]
    assert where(call.args[0].span) == (1, 11, 1, 27)
    assert dump(expr("f(a).layers[1:3]")) == "f(a).layers[1:3]"


def test_def():
    (d,) = statements("def soup3(a, b, c) = linear(a, b, c)\n")
    assert isinstance(d, ast.Def)
    assert d.name == "soup3" and d.params == ("a", "b", "c")
    assert dump(d.body) == "linear(a, b, c)"
    assert where(d.span) == (1, 1, 1, 37)
    assert where(d.name_span) == (1, 5, 1, 10)
    assert statements("def k() = base\n")[0].params == ()
    assert statements("def one(m,) = m\n")[0].params == ("m",)


def test_save_with_options():
    (s,) = statements('save final to "out/final" { dtype = bf16, shard = "2GB", tokenizer = base }\n')
    assert isinstance(s, ast.Save)
    assert s.value == ast.Name("final", s.value.span)
    assert s.path == "out/final"
    assert [(o.name, dump(o.value)) for o in s.options] == [("dtype", "bf16"), ("shard", '"2GB"'), ("tokenizer", "base")]
    assert all(isinstance(o, ast.Option) for o in s.options)
    assert where(s.span) == (1, 1, 1, 76)
    assert where(s.path_span) == (1, 15, 1, 26)
    assert where(s.options[1].span) == (1, 43, 1, 48)  # the option's name


def test_save_without_options_and_of_an_expression():
    (s,) = statements('save tv to "out/ties"\n')
    assert s.options == () and s.path == "out/ties"
    assert statements('save tv to "o" {}\n')[0].options == ()
    assert [o.name for o in statements('save tv to "o" {dtype = bf16,}\n')[0].options] == ["dtype"]
    (s,) = statements('save slerp(a, b, t = 0.5) with {mlp: a} to "out/x"\n')
    assert dump(s.value) == "(slerp(a, b, t=0.5) with {mlp: a})"
    assert s.path == "out/x"


def test_comments_anywhere():
    text = (
        "# a header comment\n"
        "x = slerp(  # after an open paren\n"
        "  a,  # after an argument\n"
        "  b, t = {  # in a table\n"
        "    mlp: 1, # after an entry\n"
        "    _: 0    # before the close\n"
        "  }\n"
        ") # after the statement\n"
        '  # indented\nsave x to "o" # at the end, without a newline'
    )
    stmts = statements(text)
    assert [dump(s) for s in stmts] == [
        "2:1-8:2 x = slerp(a, b, t={mlp: 1, _: 0})",
        '10:1-10:14 save x to "o" {}',
    ]


def test_statements_spanning_lines_and_sharing_lines():
    stmts = statements('a = model("a") b = model(\n"b")\nc =\n  linear(a,\n b) save c to\n "o" save a to "p"')
    assert [dump(s) for s in stmts] == [
        '1:1-1:15 a = model("a")',
        '1:16-2:5 b = model("b")',
        "3:1-5:4 c = linear(a, b)",
        '5:5-6:5 save c to "o" {}',
        '6:6-6:19 save a to "p" {}',
    ]


def test_empty_recipes():
    assert statements("") == ()
    assert statements("\n\n   \n") == ()
    assert statements("# nothing but a comment") == ()


def test_recipe_keeps_its_source():
    text = "x = 1\n"
    recipe = parse(text, "named.merge")
    assert recipe.source.name == "named.merge" and recipe.source.text == text
    assert recipe.statements[0].span.source is recipe.source
    assert str(recipe.statements[0].value.span) == "named.merge:1:5"


def test_golden_recipe_with_every_construct():
    recipe = parse_file(FIXTURES / "all_constructs.merge")
    expected = (FIXTURES / "all_constructs.ast").read_text().strip().split("\n")
    assert [dump(s) for s in recipe.statements] == expected
    assert recipe.source.name == str(FIXTURES / "all_constructs.merge")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_parses(path):
    recipe = parse_file(path)
    assert recipe.statements
    assert any(isinstance(s, ast.Save) for s in recipe.statements)


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"quickstart.merge", "selectors.merge", "frankenmerge.merge"}


def test_parse_file_that_does_not_exist(tmp_path):
    with pytest.raises(RecipeSyntaxError) as info:
        parse_file(tmp_path / "missing.merge")
    assert "cannot read recipe" in info.value.render()
    assert str(tmp_path / "missing.merge") in info.value.render()


# --- syntax errors ---------------------------------------------------------------------------


def test_syntax_errors_are_mgc_errors():
    err = syntax_error("x = (\n")
    assert isinstance(err, MgcError)
    assert err.kind == "error"


def test_missing_close_paren_at_end_of_file():
    assert_syntax_error("x = slerp(a, b, t = 0.5\n", 1, 24, "unexpected end of file", "a ')' is missing")
    assert_syntax_error("x = slerp(a, b, t = 0.5", 1, 24, "unexpected end of file", "a ')' is missing")
    # in a statement that spans lines, the end of its last line
    assert_syntax_error("x = slerp(a,\n  b,\n  t = 0.5\n", 3, 10, "unexpected end of file", "a ')' is missing")


def test_missing_close_paren_before_the_next_statement():
    assert_syntax_error("x = slerp(a, b\ny = 1\n", 2, 1, "unexpected 'y'", "a ',' or a ')' is missing before this")


def test_missing_comma_between_args():
    assert_syntax_error("x = slerp(a b, t = 0.5)\n", 1, 13, "unexpected 'b'", "a ',' or a ')' is missing before this")
    assert_syntax_error(
        "x = [1, 2]\ny = slerp(a, b t = 0.5)\n", 2, 16, "unexpected 't'", "a ',' or a ')' is missing before this"
    )


def test_the_hint_names_the_innermost_open_bracket():
    """lark's expected set mixes every bracket's closer; the hint and the list name the one still open."""
    assert_syntax_error("x = linear(a, weights = [1 2])\n", 1, 28, "expected ',', '.', ']'", "a ',' or a ']' is missing before this")
    assert_syntax_error('save a to "o" { dtype = bf16 shard = "1GB" }\n', 1, 30, "expected ',', '}'",
                        "a ',' or a '}' is missing before this", width=5)
    assert_syntax_error("x = linear(a, weights = [1, 2", 1, 30, "expected ',', ']'", "a ']' is missing")
    # brackets inside strings and comments are not brackets
    assert_syntax_error('x = slerp(a, "[(" b)  # ]\n', 1, 19, "unexpected 'b'", "a ',' or a ')' is missing before this")


def test_colon_instead_of_equals_for_a_keyword_arg():
    assert_syntax_error(
        "x = slerp(a, b, t: 0.5)\n", 1, 18, "unexpected ':'", "parameters and options are written name = value"
    )


def test_equals_instead_of_colon_in_a_table():
    assert_syntax_error(
        "x = slerp(a, b, t = {mlp = 0.5})\n", 1, 26, "unexpected '='", "table entries are written key: value"
    )


def test_unterminated_list_at_end_of_file():
    assert_syntax_error("x = [1, 2\n", 1, 10, "unexpected end of file", "a ']' is missing")
    assert_syntax_error("x = [1, 2 # a comment", 1, 22, "unexpected end of file", "a ']' is missing")


def test_unterminated_table_at_end_of_file():
    assert_syntax_error("x = slerp(a, b, t = {mlp: 0.5\n", 1, 30, "unexpected end of file", "a '}' is missing")
    assert_syntax_error("x = slerp(a, b, t = {\n  mlp: 0.5,\n  _: 1,\n", 3, 8, "unexpected end of file", "a '}' is missing")


def test_single_quoted_strings():
    assert_syntax_error("x = model('a')\n", 1, 11, "unexpected character \"'\"", "strings use double quotes")


def test_unterminated_string():
    assert_syntax_error('x = model("a)\n', 1, 11, "unexpected character '\"'")


@pytest.mark.parametrize("keyword", ["to", "with"])
def test_keyword_lexed_as_a_name_cannot_be_assigned(keyword):
    assert_syntax_error(f"{keyword} = 3\n", 1, 1, f"'{keyword}' is a keyword and cannot be a name", width=len(keyword))


@pytest.mark.parametrize("keyword", ["save", "def"])
def test_statement_keyword_cannot_be_assigned(keyword):
    # `save = ...` must be reported like `to = ...`: at the keyword, saying it is one; not as a
    # stray '=' after it, which leaves the user to guess that `save` is reserved.
    err = syntax_error(f'{keyword} = model("a")\n')
    assert err.span is not None and where(err.span)[:2] == (1, 1), err.render()
    assert "keyword" in err.render(), err.render()


def test_keyword_as_a_def_name():
    assert_syntax_error("def with(a) = a\n", 1, 5, "'with' is a keyword and cannot be a name", width=4)


def test_keyword_as_a_def_parameter():
    # the def's name is checked against the keywords; its parameters must be too
    assert_syntax_error("def f(to) = to\n", 1, 7, "'to' is a keyword and cannot be a name", width=2)


def test_keyword_where_a_statement_begins():
    assert_syntax_error("x = y\n to = 3\n", 2, 2, "unexpected 'to'", "'to' is a keyword", width=2)


def test_positional_after_keyword_arg():
    assert_syntax_error(
        "x = slerp(a, t = 1, b)\n", 1, 21, "positional argument after a keyword argument",
        "put the models first, then name = value",
    )


def test_duplicated_keyword_is_reported_at_the_repeat():
    # like a duplicated def parameter, the error points at the second occurrence
    assert_syntax_error("x = slerp(a, b, t = 1, t = 2)\n", 1, 24, "parameter 't' given twice")
    assert_syntax_error("x = f(a = 1, b = 2,\n  a = 3)\n", 2, 3, "parameter 'a' given twice")


def test_duplicated_def_parameter():
    assert_syntax_error("def f(a, b, a) = a\n", 1, 13, "parameter 'a' appears twice in def f")


def test_attribute_other_than_layers():
    assert_syntax_error(
        "x = stack(m.foo[0:2])\n", 1, 13, "models have no attribute 'foo'", "the only attribute is .layers[a:b]", width=3
    )


def test_bad_selector_key():
    assert_syntax_error(
        "x = slerp(a, b, t = {foo[0:2]: 1})\n", 1, 22, "'foo[...]' is not a selector",
        "a layer range is written layers[a:b]", width=3,
    )


def test_layers_outside_a_table_or_slice():
    assert_syntax_error("x = layers[0:2]\n", 1, 11, "unexpected '['")


@pytest.mark.parametrize(
    "text, col, bad",
    [("x = a.layers[0:2:3]\n", 17, "':'"), ("x = a.layers[]\n", 14, "']'")],
)
def test_malformed_layer_slices(text, col, bad):
    assert_syntax_error(text, 1, col, f"unexpected {bad}")


def test_unexpected_character():
    assert_syntax_error("x = a @ b\n", 1, 7, "unexpected character '@'")
    assert_syntax_error(
        "x = a + b\n", 1, 7, "unexpected character '+'",
        "arithmetic is not part of the language; use linear(...) to weight models",
    )


def test_statement_that_is_not_an_assignment():
    assert_syntax_error(
        "slerp(a, b)\n", 1, 6, "unexpected '('",
        "a statement is `name = expression`, `def name(params) = expression` or `save expression to \"dir\"`",
    )


def test_malformed_saves():
    assert_syntax_error("save x to y\n", 1, 11, "unexpected 'y'")
    assert_syntax_error("save x\n", 1, 7, "unexpected end of file")
    assert_syntax_error('save x to "o" { dtype: bf16 }\n', 1, 22, "unexpected ':'",
                        "parameters and options are written name = value")


def test_error_width_covers_the_token():
    assert_syntax_error('x = "a" "bcd"\n', 1, 9, "unexpected '\"bcd\"'", "a ',' or a ')' is missing before this", width=5)


@pytest.mark.parametrize("text", [r'x = model("\x4")' "\n", r'x = model("a\N{NO SUCH NAME}b")' "\n"])
def test_bad_string_escape_is_a_syntax_error(text):
    # an escape Python cannot decode must be reported as a syntax error at the string,
    # not escape as lark's VisitError
    err = syntax_error(text)
    assert err.span is not None and where(err.span)[:2] == (1, 11), err.render()


def test_bad_escape_in_a_save_path_is_a_syntax_error():
    err = syntax_error('save x to "out\\x4"\n')
    assert err.span is not None and where(err.span)[:2] == (1, 11), err.render()


@pytest.mark.parametrize("separator", ["\u2028", "\x0c", "\x1c"])
def test_excerpt_shows_the_line_lark_counted(separator):
    # lark counts lines by '\n' only; a Unicode line separator in a comment (or a form feed,
    # which is whitespace) must not shift the source line shown under the error.
    text = f"# a comment{separator}with a separator\nx = [1 2]\n"
    err = syntax_error(text)
    assert where(err.span)[:2] == (2, 8)
    assert err.render().split("\n")[1] == "    x = [1 2]"


def test_end_of_file_line_is_counted_like_lark_counts():
    assert_syntax_error("# a\u2028b\nx = [1, 2\n", 2, 10, "unexpected end of file", "a ']' is missing")
