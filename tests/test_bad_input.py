"""Bad input is never a traceback: each case the fuzzer once found (tests/test_fuzz.py) is an MgcError with a
location, and the command line exits 1 for it, and 70 only for a bug in mgc."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from mgc.api import compile_recipe
from mgc.cli import main
from mgc.compiler.check import parse_size
from mgc.core.errors import CheckpointError, MgcError, RecipeSyntaxError
from mgc.grammar import parse, parse_file
from mgc.grammar.parse import MAX_NESTING

from conftest import MODELS

HEADER = "".join(f'{m} = model("{MODELS / m}")\n' for m in ("base", "code"))


def compile_text(body: str, tmp_path: Path):
    return compile_recipe("r.merge", text=HEADER + body + f'\nsave m to "{tmp_path / "out"}"\n')


def error(body: str, tmp_path: Path, kind: type = MgcError) -> MgcError:
    with pytest.raises(MgcError) as info:
        compile_text(body, tmp_path)
    assert isinstance(info.value, kind), info.value.render()
    return info.value


def located(err: MgcError, line: int, col: int | None = None) -> None:
    assert err.span is not None, err.render()
    assert err.span.line == line, err.render()
    if col is not None:
        assert err.span.col == col, err.render()
    assert "^" in err.render()


# --- the recipe's bytes ----------------------------------------------------------------------


def test_a_byte_that_is_not_utf8_is_reported_where_it_is(tmp_path):
    recipe = tmp_path / "r.merge"
    recipe.write_bytes('base = model("é")\nx = \xff\n'.encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    with pytest.raises(RecipeSyntaxError) as info:
        parse_file(recipe)
    located(info.value, 2, 5)
    assert "not UTF-8" in info.value.message and "0xff" in info.value.message
    assert str(info.value.span).startswith(f"{recipe}:2:5")


def test_a_recipe_path_holding_a_nul_is_an_error():
    with pytest.raises(RecipeSyntaxError, match="cannot read recipe"):
        parse_file("a\0b.merge")


@pytest.mark.parametrize("text", ['"a\\x00b"', '"a\x00b"', '"\\0"'])
def test_strings_cannot_hold_nul(text, tmp_path):
    err = error(f"m = model({text})", tmp_path)
    located(err, 3, 11)
    assert "NUL" in err.message
    err = error(f'm = base\nsave base to {text}', tmp_path)
    located(err, 4, 14)


def test_an_unknown_escape_stays_as_written_even_when_warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recipe = parse('m = model("a\\d")')
    assert recipe.statements[0].value.args[0].value == "a\\d"


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [
    "9" * 5000, "0" * 5000 + "1" + "0" * 19, "9223372036854775808", "-9223372036854775809", "1e309", "-1e309",
    "1" + "0" * 400 + ".5",
])
def test_numbers_out_of_range(number, tmp_path):
    err = error(f"m = linear(base, weights = {number})", tmp_path, RecipeSyntaxError)
    located(err, 3, 28)
    assert err.message == "number out of range"


def test_numbers_at_the_ends_of_the_range_parse():
    for text, value in [("9223372036854775807", 2**63 - 1), ("-9223372036854775808", -(2**63)), ("0" * 5000 + "7", 7),
                        ("1e308", 1e308), ("1e-400", 0.0)]:
        assert parse(f"x = f({text})").statements[0].value.args[0].value == value


@pytest.mark.parametrize("bound", ["9" * 5000, "99999999999999999999", "-9223372036854775809"])
def test_layer_bounds_out_of_range(bound, tmp_path):
    err = error(f"m = stack(base.layers[0:{bound}])", tmp_path, RecipeSyntaxError)
    located(err, 3, 25)


@pytest.mark.parametrize("shard", ["1e300", '"' + "9" * 400 + 'GB"', '"' + "9" * 5000 + '"', '"9223372036854775808"',
                                   "9223372036854775807.0"])
def test_huge_shard_sizes(shard, tmp_path):
    err = error(f"m = base\nsave base to \"{tmp_path / 'o2'}\" {{ shard = {shard} }}", tmp_path)
    located(err, 4)
    assert "shard must be a size" in err.message


def test_parse_size_never_overflows():
    assert parse_size("9" * 400 + "TB") is None
    assert parse_size("1." + "0" * 5000 + "KB") == 1000
    assert parse_size("9223372036854775807") == 2**63 - 1
    assert parse_size("9223372036854775808") is None
    assert parse_size("8 EiB") is None and parse_size("2GB") == 2 * 10**9 and parse_size("1.5KiB") == 1536
    assert parse_size("\u0663GB") is None  # not an ASCII digit


def test_max_memory_too_large_is_a_usage_error(tmp_path):
    recipe = tmp_path / "r.merge"
    recipe.write_text(HEADER + f'save base to "{tmp_path / "out"}"\n')
    result = CliRunner().invoke(main, ["run", "--max-memory", "9" * 400 + "TB", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "--max-memory" in result.output and "not a size" in result.output


# --- nesting ---------------------------------------------------------------------------------

NESTED = {  # form: (recipe of k repetitions, levels of nesting per repetition)
    "calls": (lambda k: "m = " + "linear(" * k + "base" + ")" * k, 1),
    "lists": (lambda k: "m = linear(base, weights = " + "[" * k + "1" + "]" * k + ")", 1),
    "tables": (lambda k: "m = linear(base, weights = " + "{_: " * k + "1" + "}" * k + ")", 1),
    "with": (lambda k: "m = base" + " with {mlp: code}" * k, 1),
    "nested with": (lambda k: "m = " + "(base with {mlp: " * k + "code" + "})" * k, 1),
    "stack": (lambda k: "m = " + "stack(" * k + "base" + ")" * k, 1),
    "slices": (lambda k: "m = " + "stack(" * k + "base" + ".layers[0:8])" * k, 2),  # stack( and .layers[]
}


@pytest.mark.parametrize("form", NESTED)
def test_deep_nesting_is_an_error_not_a_recursion_error(form, tmp_path):
    recipe, per = NESTED[form]
    err = error(recipe(300), tmp_path, RecipeSyntaxError)
    located(err, 3)
    assert "nested too deeply" in err.message
    err = error(recipe(MAX_NESTING // per + 1), tmp_path, RecipeSyntaxError)
    assert "nested too deeply" in err.message
    if form not in ("lists", "tables"):  # nested lists and tables are refused later, as values
        compile_text(recipe(MAX_NESTING // per), tmp_path)
    if form == "calls":  # parentheses alone are no level of nesting, and harmless
        compile_text("m = " + "(" * 20000 + "base" + ")" * 20000, tmp_path)


@pytest.mark.parametrize("body", [
    lambda i: f"f{i - 1}(x)",
    lambda i: f"linear(f{i - 1}(x), weights = [{i}])",
])
def test_long_chains_of_defs_are_an_error_at_the_call(body, tmp_path):
    defs = "def f0(x) = linear(x)\n" + "".join(f"def f{i}(x) = {body(i)}\n" for i in range(1, 300))
    with pytest.raises(MgcError) as info:
        compile_recipe("r.merge", text=HEADER + defs + f'save f299(base) to "{tmp_path / "out"}"\n')
    assert "def calls nested too deeply" in info.value.message, info.value.render()
    assert info.value.span is not None
    short = "def f0(x) = linear(x)\n" + "".join(f"def f{i}(x) = {body(i)}\n" for i in range(1, 20))
    compile_recipe("r.merge", text=HEADER + short + f'save f19(base) to "{tmp_path / "out"}"\n')


def test_a_long_flat_chain_of_assignments_is_an_error(tmp_path):
    chain = "a0 = base\n" + "".join(f"a{i} = linear(a{i - 1})\n" for i in range(1, 600)) + "m = a599"
    err = error(chain, tmp_path)
    assert err.span is not None, err.render()


# --- checkpoint paths and the hub ------------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch, tmp_path):
    """Opening an hf:// checkpoint recorded, never on the network: it opens the example base model
    (tests/test_hub.py runs the real thing against a stand-in of the hub)."""
    from mgc.core import hub_checkpoint
    from mgc.core.checkpoint import Checkpoint

    calls = []

    def open_remote(text, opened):
        repo_id, _, revision = text[len("hf://"):].partition("@")
        calls.append((repo_id, revision or None))
        ckpt = Checkpoint.open(MODELS / "base")
        return opened.setdefault(ckpt.path, ckpt)

    monkeypatch.setattr(hub_checkpoint, "open_remote", open_remote)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "other").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    return calls


def open_model(path: str, tmp_path: Path):
    return compile_recipe("r.merge", text=f'm = model("{path}")\nsave m to "{tmp_path / "out" / "m"}"\n')


@pytest.mark.parametrize("path", [
    "models/base", "./org/name", "../org/name", "/org/name", "~/org/name", "out/name", "org/name", "org/name@main",
])
def test_only_hf_urls_are_fetched(path, hub_calls, tmp_path):
    with pytest.raises(CheckpointError) as info:
        open_model(path, tmp_path)
    assert hub_calls == []
    located(info.value, 1, 11)
    assert info.value.message == f"no checkpoint folder at '{path}'"


def test_a_missing_hub_shaped_path_says_how_to_fetch_it(hub_calls, tmp_path):
    with pytest.raises(CheckpointError) as info:
        open_model("meta-llama/Llama-3-8B", tmp_path)
    assert info.value.hint.endswith('; to fetch it from the Hugging Face hub, write model("hf://meta-llama/Llama-3-8B")')
    with pytest.raises(CheckpointError) as info:
        open_model("models/base", tmp_path)  # models/ is here: a local path, no hub hint
    assert "hf://" not in (info.value.hint or "")


def test_a_missing_folder_gets_a_did_you_mean_from_its_siblings(hub_calls, tmp_path):
    with pytest.raises(CheckpointError) as info:
        open_model("models/othre", tmp_path)
    assert info.value.hint == (f"looked for '{tmp_path}/models/othre' (paths are relative to the recipe's folder); "
                               "did you mean 'models/other'?")
    with pytest.raises(CheckpointError) as info:
        open_model("modles/other", tmp_path)
    assert info.value.hint.endswith("; did you mean 'models/other'?")


@pytest.mark.parametrize("url, call", [
    ("hf://org/name", ("org/name", None)), ("hf://org/name@v1.0", ("org/name", "v1.0")),
])
def test_hf_urls_are_fetched(url, call, hub_calls, tmp_path):
    plan = open_model(url, tmp_path)
    assert hub_calls == [call]
    assert plan.program.saves[0].model.checkpoint.path == (MODELS / "base").resolve()


def test_a_malformed_hf_url_is_not_fetched(hub_calls, tmp_path):
    with pytest.raises(CheckpointError, match="not a hub id"):
        open_model("hf://name-without-org", tmp_path)
    assert hub_calls == []


@pytest.mark.parametrize("path", ["a" * 5000, "a/" * 3000 + "b"])
def test_overlong_checkpoint_paths(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        open_model(path, tmp_path)
    located(info.value, 1, 11)


# --- the command line ------------------------------------------------------------------------


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    recipe = tmp_path / "r.merge"
    recipe.write_text(HEADER + f'save base to "{tmp_path / "out"}"\n')
    return recipe


def test_a_bug_exits_70_with_a_short_message(recipe_file, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nmore")

    monkeypatch.setattr("mgc.api.compile_recipe", broken)
    monkeypatch.delenv("MGC_DEBUG", raising=False)
    for command in ("check", "plan", "graph", "run"):
        result = CliRunner().invoke(main, [command, str(recipe_file)])
        assert result.exit_code == 70, result.output
        assert "internal error (a bug in mgc, please report it): ZeroDivisionError: division by zero\n" in result.output
        assert "Traceback" not in result.output and "more" not in result.output
    result = CliRunner().invoke(main, ["check", str(recipe_file)], env={"MGC_DEBUG": "1"})
    assert result.exit_code == 70
    assert "Traceback (most recent call last)" in result.output and "internal error" in result.output

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mgc.api.compile_recipe", interrupted)  # Ctrl-C is not a bug
    result = CliRunner().invoke(main, ["check", str(recipe_file)])
    assert result.exit_code not in (0, 70)
    assert "internal error" not in result.output


def test_an_mgc_error_escaping_a_command_exits_1(monkeypatch):
    def fails(op):
        raise CheckpointError("no such thing")

    monkeypatch.setattr("mgc.opdocs.describe", fails)
    result = CliRunner().invoke(main, ["ops", "linear"])
    assert result.exit_code == 1
    assert "error: no such thing" in result.output


def test_bad_recipes_exit_1_on_the_command_line(tmp_path):
    recipe = tmp_path / "r.merge"
    for text in (b"x = \xff", b"m = " + b"linear(" * 500 + b"x" + b")" * 500, b"m = f(" + b"9" * 5000 + b")"):
        recipe.write_bytes(text)
        for command in ("check", "plan"):
            result = CliRunner().invoke(main, [command, str(recipe)])
            assert result.exit_code == 1, result.output
            assert f"{recipe}:1:" in result.output


def test_an_overlong_fisher_data_path_is_a_located_error(tmp_path):
    err = error(f'm = code\nf = fisher(code, data = "{"p" * 300}")\n', tmp_path, CheckpointError)
    located(err, 4, 25)
    assert "File name too long" in err.message


def test_a_recipe_that_saves_nothing_points_at_its_end():
    with pytest.raises(MgcError) as info:
        compile_recipe("r.merge", text="x = 1\n\n")
    assert "saves nothing" in info.value.message
    located(info.value, 1, 6)


def test_karcher_iterations_are_bounded(tmp_path):
    err = error("m = karcher(base, code, max_iter = 9223372036854775807, tol = 1e-300)", tmp_path)
    located(err, 3)
    assert "max_iter" in err.render()


@pytest.mark.parametrize("body, col, message", [
    ("m = extract_lora(code, base = base, rank = 0)", 44, "rank = 0"),
    ("m = extract_lora(code, base = base, rank = 33)", 44, "rank 33 is more than tensor"),
    ("m = extract_lora(code, base = base, energy = 1.5)", 46, "energy = 1.5"),
    ('m = extract_lora(code, base = base, rank = 2, targets = ["nowhere"])', 58, "matches no tensor"),
    ("m = extract_lora(code, rank = 2)", 5, "needs `base = <model>`"),
    ("m = linear(extract_lora(code, base = base, rank = 2))", 12, "an adapter"),
])
def test_extract_lora_misuse_is_a_located_error(body, col, message, tmp_path):
    err = error(body, tmp_path)
    located(err, 3, col)
    assert message in err.message, err.render()
