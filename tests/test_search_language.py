"""Free parameters in the language: search(...) domains, their names, their check against each operator's schema,
`--set NAME=VALUE`, and a run that refuses while any is free."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from mgc.api import compile_recipe
from mgc.cli import main
from mgc.compiler.check import check
from mgc.compiler.search_space import bound_text
from mgc.core.errors import MgcError
from mgc.grammar import parse

from conftest import MODELS, load_folder

HEAD = f'base = model("{MODELS}/base")\ncode = model("{MODELS}/code")\nmath = model("{MODELS}/math")\n'


def _check(body: str, **kw):
    return check(parse(HEAD + body, "r.merge"), **kw)


def _error(body: str, **kw) -> MgcError:
    with pytest.raises(MgcError) as e:
        _check(body, **kw)
    return e.value


def test_domains_everywhere_a_number_goes_with_names_from_where_they_stand():
    p = _check(
        "merged = slerp(base, code, t = search(0, 1))\n"
        "mix = linear(code, math, weights = [search(0.1, 2, log = true), search([0.5, 1, 2])])\n"
        'save slerp(merged, mix, t = { "mlp": ramp(0, search(0, 1, name = "late")), _: 0.5 }) to "out"\n'
    )
    assert [d.name for d in p.domains.values()] == ["merged.t", "mix.weights[0]", "mix.weights[1]", "late"]
    t, w0, w1, late = p.domains.values()
    assert (t.low, t.high, t.default) == (0, 1, 0.5)
    assert w0.log and w0.default == pytest.approx((0.1 * 2) ** 0.5)  # the log scale's middle
    assert w1.choices == (0.5, 1, 2) and w1.default == 0.5
    assert (t.span.line, t.span.col) == (4, 32)
    assert set(p.free) == set(p.domains)


def test_a_domain_in_a_def_is_one_parameter_and_equal_names_are_told_apart():
    p = _check(
        "def half(a, b) = slerp(a, b, t = search(0, 1))\n"
        "x = linear(half(base, code), half(base, math), weights = [search(0, 1), search(0, 1)])\n"
        "save x to \"out\"\n"
    )
    names = [d.name for d in p.domains.values()]
    assert names[0] == "half.t" and len(names) == 3  # the def's domain once, however often it is called
    assert names[1:] == ["x.weights[0]", "x.weights[1]"]
    q = _check("a = slerp(base, code, t = search(0, 1))\na = slerp(a, math, t = search(0, 1))\nsave a to \"o\"\n")
    assert [d.name for d in q.domains.values()] == ["a.t@4:27", "a.t@5:24"]


@pytest.mark.parametrize("body, message, hint", [
    ("save slerp(base, code, t = search(0, 1.5)) to \"o\"", "t = 1.5", "the domain reaches 1.5"),
    ("save slerp(base, code, t = search(-1, 1)) to \"o\"", "t = -1", "the domain reaches -1"),
    ("save ties(code, math, base = base, density = search([0.5, 1.5])) to \"o\"", "density", "1.5"),
    ("save slerp(base, code, t = ramp(search(0, 2), 1)) to \"o\"", "slerp()", "the domain reaches 2"),
    ("save slerp(base, code, t = { mlp: search(0, 3), _: 0 }) to \"o\"", "t = 1.5", "at their defaults (save.t{mlp} = 1.5)"),
    ("save slerp(base, code, t = { mlp: search(0, 3, default = 0), _: 0 }) to \"o\"", "t = 3", "the domain reaches 3"),
])
def test_a_domain_that_leaves_a_parameters_range_is_an_error_at_its_span(body, message, hint):
    err = _error(body)
    assert message in err.message and hint in (err.hint or ""), err.render()
    assert err.span is not None and err.span.line == 4


@pytest.mark.parametrize("expr, message", [
    ("search(1, 0)", "is empty"),
    ("search(0, 1, log = true)", "above 0"),
    ("search([])", "at least one choice"),
    ("search([1, 1])", "twice"),
    ('search("a", 1)', "finite numbers"),
    ("search(0)", "low and a high bound"),
    ("search(0, 1, 2)", "low and a high bound"),
    ("search(0, 1, default = 2)", "default"),
    ("search(0, 1, step = 2)", "unknown parameter 'step'"),
    ("search([0.5], log = true)", "no `log`"),
    ('search(0, 1, name = "")', "non-empty"),
    ("search(0, 1, log = 1)", "true or false"),
    ("search(0, 1e999)", "number out of range"),
])
def test_bad_domains_are_located_errors(expr, message):
    err = _error(f"save slerp(base, code, t = {expr}) to \"o\"")
    assert message in err.message and err.span is not None, err.render()


def test_set_binds_by_name_and_the_bound_text_reads_as_the_same_numbers():
    body = "merged = slerp(base, code, t = search(0, 1))\nsave linear(merged, math, weights = [1, search(0.1, 10, log = true)]) to \"o\"\n"
    p = _check(body, values={"merged.t": 0.3})
    assert list(p.assignment.values()) == [0.3] and [d.name for d in p.free.values()] == ["save.weights[1]"]
    text = bound_text(HEAD + body, p.domains, {**p.assignment, **{k: 1 / 3 for k in p.free}})
    assert "t = 0.3)" in text and "weights = [1, 0.3333333333333333]" in text and "search" not in text
    again = check(parse(text, "r.merge"))
    assert not again.domains


@pytest.mark.parametrize("values, message", [
    ({"merged.tt": 0.5}, "no free parameter 'merged.tt'"),
    ({"merged.t": 2}, "outside its domain"),
])
def test_set_refuses_unknown_names_and_values_outside_the_domain(values, message):
    err = _error("merged = slerp(base, code, t = search(0, 1))\nsave merged to \"o\"\n", values=values)
    assert message in err.message


def test_run_refuses_free_parameters_and_set_runs_the_bound_recipe(tmp_path):
    recipe = tmp_path / "r.merge"
    recipe.write_text(HEAD + "save slerp(base, code, t = search(0, 1)) to \"out\"\n")
    literal = tmp_path / "lit.merge"
    literal.write_text(HEAD + "save slerp(base, code, t = 0.25) to \"lit\"\n")
    runner = CliRunner()
    refused = runner.invoke(main, ["run", str(recipe), "-q", "--device", "cpu"])
    assert refused.exit_code == 1 and "1 free parameter" in refused.output and "--set save.t=0.5" in refused.output
    assert not (tmp_path / "out").exists()
    ok = runner.invoke(main, ["run", str(recipe), "-q", "--device", "cpu", "--set", "save.t=0.25"])
    assert ok.exit_code == 0, ok.output
    assert runner.invoke(main, ["run", str(literal), "-q", "--device", "cpu"]).exit_code == 0
    a, b = load_folder(tmp_path / "out"), load_folder(tmp_path / "lit")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    printed = runner.invoke(main, ["recipe", str(tmp_path / "out")])
    assert "t = 0.25" in printed.output and "search" not in printed.output  # the output records the bound recipe
    bad = runner.invoke(main, ["run", str(recipe), "--set", "save.t"])
    assert bad.exit_code == 2 and "NAME=NUMBER" in bad.output


def test_check_lists_free_parameters_and_plan_says_what_a_search_computes_once(tmp_path):
    recipe = tmp_path / "r.merge"
    recipe.write_text(HEAD + "mix = karcher(code, math)\nsave slerp(base, mix, t = search(0, 1)) to \"out\"\n")
    runner = CliRunner()
    out = runner.invoke(main, ["check", str(recipe)])
    assert out.exit_code == 0 and "free parameter save.t = search(0, 1) at 5:27 (default 0.5)" in out.output
    plan = runner.invoke(main, ["plan", str(recipe)])
    assert plan.exit_code == 0, plan.output
    assert "0 of 75 saved tensors do not depend" in plan.output and "kept            75 computed tensors" in plan.output
    assert compile_recipe(recipe, values={"save.t": 1.0}).program.free == {}


def test_two_free_parameters_cannot_share_a_name():
    err = _error('save linear(code, math, weights = [search(0.1, 1, name = "a"), search(0.2, 0.9, name = "a")]) to "o"')
    assert "two free parameters are named 'a'" in err.message and "the other is at r.merge:4:" in err.hint
