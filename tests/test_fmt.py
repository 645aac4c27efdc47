"""`mgc fmt`: the canonical layout of recipes (mgc/grammar/format.py).

Formatting is idempotent, keeps the meaning (the AST, spans aside) and every comment, on the examples and on
fuzzed recipes; every example is formatted (the CI check `mgc fmt --check examples/`)."""
from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
from click.testing import CliRunner

from mgc.cli import main
from mgc.core.errors import MgcError, RecipeSyntaxError, Span
from mgc.grammar import ast, parse
from mgc.grammar.format import WIDTH, _scan, format_text

from conftest import EXAMPLES
from test_fuzz import RecipeGen, make_recipe

ALL_EXAMPLES = sorted(EXAMPLES.rglob("*.merge"))
N_FUZZ = 300


def shape(node):
    """A node as nested tuples without its spans: two recipes that mean the same have the same shape."""
    if isinstance(node, ast.Recipe):
        return tuple(shape(s) for s in node.statements)
    if dataclasses.is_dataclass(node):
        return (type(node).__name__,) + tuple(
            shape(getattr(node, f.name)) for f in dataclasses.fields(node) if not isinstance(getattr(node, f.name), Span)
        )
    if isinstance(node, (tuple, list)):
        return tuple(shape(x) for x in node)
    if isinstance(node, float):
        return ("float", node)  # 1 and 1.0 differ in the AST, and so here
    return node


def comments(text: str) -> Counter:
    return Counter(c.text for c in _scan(text)[0])


def check_roundtrip(text: str, name: str = "<recipe>") -> str:
    formatted = format_text(text, name)
    assert format_text(formatted, name) == formatted, "not idempotent"
    assert shape(parse(formatted)) == shape(parse(text, name)), "the meaning changed"
    assert comments(formatted) == comments(text), "comments lost or changed"
    assert formatted == "" or formatted.endswith("\n") and not formatted.endswith("\n\n")
    assert "\n\n\n" not in formatted and not formatted.startswith("\n")
    return formatted


def test_shape_ignores_spans_only():
    assert shape(parse("a = f(b, t = 1)")) == shape(parse("\n\n  a =\n f( b ,t=1 , )"))
    assert shape(parse("a = f(b, t = 1)")) != shape(parse("a = f(b, t = 1.0)"))
    assert shape(parse("a = f(b, t = 1)")) != shape(parse("a = f(c, t = 1)"))


@pytest.mark.parametrize("path", ALL_EXAMPLES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_examples_are_formatted(path):
    """The CI check: `mgc fmt --check examples/` passes."""
    text = path.read_text(encoding="utf-8")
    assert check_roundtrip(text, str(path)) == text, f"run `mgc fmt {path}`"


def test_check_examples_folder_cli():
    r = CliRunner().invoke(main, ["fmt", "--check", str(EXAMPLES)])
    assert r.exit_code == 0, r.output


def _valid_fuzzed(seed: int, n: int):
    rng = random.Random(seed)
    found = 0
    tries = 0
    while found < n and tries < n * 20:
        tries += 1
        data = make_recipe(rng) if tries % 3 == 0 else RecipeGen(rng).recipe().encode()
        try:
            text = data.decode("utf-8")
            parse(text)
        except (UnicodeDecodeError, MgcError):
            continue
        found += 1
        yield text


def test_fuzzed_recipes_roundtrip():
    n = 0
    for text in _valid_fuzzed(1234, N_FUZZ):
        try:
            check_roundtrip(text)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- recipe:\n{text[:3000]}\n--- formatted:\n{format_text(text)[:3000]}") from None
        n += 1
    assert n >= N_FUZZ // 2


def test_fuzzed_recipes_with_comments_roundtrip():
    """Comments inserted anywhere a line ends, and on lines of their own, inside multi-line calls too."""
    rng = random.Random(99)
    for i, text in enumerate(_valid_fuzzed(4321, N_FUZZ // 3)):
        lines = format_text(text).split("\n")  # formatted: calls that were too long span several lines
        out = []
        for j, line in enumerate(lines):
            if rng.random() < 0.2:
                out.append(f"{' ' * rng.randint(0, 6)}# own {i}.{j}")
            out.append(line + (f"  # after {i}.{j}" if line and rng.random() < 0.3 else ""))
        check_roundtrip("\n".join(out))


# ---------------------------------------------------------------- layout

def test_canonical_spacing():
    src = 'a=f(b,c,t=0.5)\nb=[1,2]\nc=x with{mlp:1,"lm_head":2,layers[0:2]:3}\nsave  a  to"o"{dtype=bf16,shard="2GB"}\n'
    assert format_text(src) == (
        "a = f(b, c, t = 0.5)\n"
        "b = [1, 2]\n"
        'c = x with { mlp: 1, "lm_head": 2, layers[0:2]: 3 }\n'
        'save a to "o" { dtype = bf16, shard = "2GB" }\n'
    )


def test_one_statement_per_line_and_blank_lines():
    src = '\n\n# head\n\n\n\na = 1 b = 2\n\n\n\nc = 3\n\n\n'
    assert format_text(src) == "# head\n\na = 1\nb = 2\n\nc = 3\n"


def test_numbers_and_strings_keep_their_spelling():
    src = 'a = f(x, t = 1e-5, u = .5, v = +3, w = 007, y = 1E3, z = -0.0)\nsave a to "o\\\\x\\u00e9\\"q"\n'
    assert format_text(src) == src


def test_alignment_of_runs():
    src = "base = m(1)\nprose = m(2)\n\nx = 1\n# c\nlonger = 2\nsave a to \"x\" { dtype = bf16 }\nsave bbb to \"yy\" { dtype = bf16 }\n"
    assert format_text(src) == (
        "base  = m(1)\nprose = m(2)\n\nx = 1\n# c\nlonger = 2\n"
        'save a   to "x"  { dtype = bf16 }\nsave bbb to "yy" { dtype = bf16 }\n'
    )


def test_comments_leading_trailing_and_inside():
    src = (
        "# top\n"
        "a = 1  # one\n"
        "bb = 2    # two\n"
        "\n"
        "# before c\n"
        "c = f(a,   # inside\n"
        "      # own line inside\n"
        "      bb)  # after c\n"
        "# end\n"
    )
    assert format_text(src) == (
        "# top\n"
        "a  = 1  # one\n"
        "bb = 2  # two\n"
        "\n"
        "# before c\n"
        "c = f(\n"
        "    a,  # inside\n"
        "    # own line inside\n"
        "    bb,\n"
        ")  # after c\n"
        "# end\n"
    )


def test_comments_inside_brackets_stay_with_their_items():
    src = (
        "m = slerp(a, b, t = { mlp: 1,  # attention\n"
        "  _: 0 })\n"
        "save m to \"o\" {  # options\n"
        "  dtype = bf16 }\n"
        "e = f(  # nothing\n"
        ")\n"
        "g = f(x.layers[  # in a slice\n"
        "0:2])\n"
        "def h(a,  # a param\n"
        "  b) = linear(a, b)\n"
    )
    assert format_text(src) == (
        "m = slerp(a, b, t = {\n"
        "    mlp: 1,  # attention\n"
        "    _:   0,\n"
        "})\n"
        "save m to \"o\" {\n"
        "    # options\n"
        "    dtype = bf16,\n"
        "}\n"
        "e = f(\n"
        "    # nothing\n"
        ")\n"
        "g = f(\n"  # a comment in no list of items goes after the items of the bracket around it
        "    x.layers[0:2],\n"
        "    # in a slice\n"
        ")\n"
        "# a param\n"  # and one outside any bracket before the statement
        "def h(a, b) = linear(a, b)\n"
    )


def test_long_calls_wrap_and_trailing_comma_keeps_them_open():
    args = ", ".join(f"model{i}" for i in range(9))
    src = f"merged = linear({args}, weights = [1, 2, 3])\n"
    out = format_text(src)
    assert out == f"merged = linear(\n    {args}, weights = [1, 2, 3]\n)\n"
    args = ", ".join(f"a_long_model_name_{i}" for i in range(8))
    out = format_text(f"merged = linear({args})\n")
    assert out.split("\n")[1] == "    a_long_model_name_0," and out.endswith("\n)\n")
    assert all(len(line) <= WIDTH for line in out.split("\n"))
    # a trailing comma: one item a line, even when short
    assert format_text("a = f(b, c,)") == "a = f(\n    b,\n    c,\n)\n"
    # and a table as the last argument hugs the call
    src = "m = slerp(a, b, t = {\n  mlp: [1, 0],\n  self_attn: 0.5,\n})\n"
    assert format_text(src) == "m = slerp(a, b, t = {\n    mlp:       [1, 0],\n    self_attn: 0.5,\n})\n"


def test_parentheses_kept_where_needed():
    src = "a = (b with { mlp: c }).layers[0:2]\nd = (e)\n"
    assert format_text(src) == "a = (b with { mlp: c }).layers[0:2]\nd = e\n"


def test_empty_and_comment_only():
    assert format_text("") == ""
    assert format_text("\n  \n") == ""
    assert format_text("# only\n\n\n# two") == "# only\n\n# two\n"


def test_crlf():
    assert format_text("a = 1\r\n# c\r\nb = 2\r\n") == "a = 1\n# c\nb = 2\n"


# ---------------------------------------------------------------- the command line

def test_fmt_rewrites_in_place_and_check(tmp_path):
    bad = tmp_path / "bad.merge"
    good = tmp_path / "sub" / "good.merge"
    good.parent.mkdir()
    bad.write_text("a=f(b,c)\n")
    good.write_text("a = f(b, c)\n")
    before = good.stat().st_mtime_ns, good.stat().st_ino
    runner = CliRunner()
    r = runner.invoke(main, ["fmt", "--check", str(tmp_path)])
    assert r.exit_code == 1 and f"would reformat {bad}" in r.output and str(good) not in r.output.split("\n")[0]
    assert bad.read_text() == "a=f(b,c)\n"  # --check writes nothing
    r = runner.invoke(main, ["fmt", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert bad.read_text() == "a = f(b, c)\n"
    assert (good.stat().st_mtime_ns, good.stat().st_ino) == before  # unchanged: not touched
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.merge", "good.merge", "sub"]  # no temp files left
    r = runner.invoke(main, ["fmt", "--check", str(bad), str(good)])
    assert r.exit_code == 0, r.output


def test_fmt_bad_recipe_is_a_located_error_and_untouched(tmp_path):
    bad = tmp_path / "bad.merge"
    other = tmp_path / "other.merge"
    bad.write_text("a = f(b,\nsave a to \"x\"\n")
    other.write_text("a=1\n")
    r = CliRunner().invoke(main, ["fmt", str(bad), str(other)])
    assert r.exit_code == 1
    assert f"{bad}:2:" in r.output and "^" in r.output
    assert bad.read_text() == "a = f(b,\nsave a to \"x\"\n"
    assert other.read_text() == "a = 1\n"  # the others are still formatted
    with pytest.raises(RecipeSyntaxError):
        format_text("a = ")


def test_fmt_missing_file(tmp_path):
    r = CliRunner().invoke(main, ["fmt", str(tmp_path / "nope.merge")])
    assert r.exit_code == 1 and "cannot read recipe" in r.output


def test_fmt_stdin():
    r = CliRunner().invoke(main, ["fmt", "-"], input="a=f(b)  # c\n")
    assert r.exit_code == 0 and r.stdout == "a = f(b)  # c\n"
    r = CliRunner().invoke(main, ["fmt", "--check", "-"], input="a=f(b)\n")
    assert r.exit_code == 1
    r = CliRunner().invoke(main, ["fmt", "--check", "-"], input="a = f(b)\n")
    assert r.exit_code == 0
    r = CliRunner().invoke(main, ["fmt", "-"], input="a = (\n")
    assert r.exit_code == 1 and "<stdin>:1:" in r.output
