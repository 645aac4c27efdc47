"""The checker: names, arity, parameter values and ranges, selectors, layer ranges, defs,
save options, checkpoints and tensor shapes (from headers alone), parameter resolution
per tensor, and the `mgc check` command. Every reported error is located exactly."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from mgc.api import compile_recipe
from mgc.cli import main
from mgc.compiler.check import Program, check
from mgc.core.errors import (
    CheckpointError, MgcError, MgcErrors, RecipeNameError, RecipeSyntaxError, RecipeTypeError,
)
from mgc.compiler.layers import layer_map
from mgc.compiler.values import CheckpointModel, OpModel, Selector, StackModel, TableV, WithModel, Num
from mgc.grammar import parse, parse_file

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NAME = "r.merge"
HEADER = "".join(f'{m} = model("{MODELS / m}")\n' for m in ("base", "code", "math", "prose"))
HEADER_LINES = HEADER.count("\n")
NUM_LAYERS = 8


# --- helpers ---------------------------------------------------------------------------------


def recipe(body: str) -> str:
    """The four example models (base, code, math, prose) assigned, then `body`."""
    return HEADER + textwrap.dedent(body).lstrip("\n")


def check_ok(body: str) -> Program:
    return check(parse(recipe(body), NAME))


def saved(body: str, index: int = 0):
    """The model written by the recipe's `index`-th save."""
    return check_ok(body).saves[index].model


def check_error(body: str, kind: type = MgcError) -> MgcError:
    with pytest.raises(MgcError) as info:
        check_ok(body)
    assert isinstance(info.value, kind), info.value.render()
    return info.value


def assert_at(err: MgcError, line: int, col: int, width: int | None = None) -> None:
    """`err` is located at `line` of the body (1 = the first line after the header), column `col`;
    its render shows that line with `width` carets under the span."""
    assert err.span is not None, err.render()
    assert (err.span.line - HEADER_LINES, err.span.col) == (line, col), err.render()
    rendered = err.render().split("\n")
    assert rendered[0].startswith(f"{NAME}:{line + HEADER_LINES}:{col}: error: "), rendered[0]
    if width is not None:
        assert rendered[2] == "    " + " " * (col - 1) + "^" * width, err.render()


def expect(body: str, kind: type, line: int, col: int, message: str, hint: str | None = None, width: int | None = None):
    err = check_error(body, kind)
    assert_at(err, line, col, width)
    assert message in err.message, err.message
    if hint is not None:
        assert err.hint is not None and hint in err.hint, err.render()
    return err


def layer_tensor(i: int, part: str = "mlp.up_proj") -> str:
    return f"model.layers.{i}.{part}.weight"


def resolved(model: OpModel, param: str, tensor: str):
    return getattr(model.resolved[tensor], param)


# --- tiny checkpoints written on the fly --------------------------------------------------------


def _example_specs() -> dict[str, tuple[list[int], str]]:
    with safe_open(str(MODELS / "code" / "model.safetensors"), "pt") as f:
        return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def write_checkpoint(folder: Path, *, hidden: int = 64, drop=(), reshape=None) -> Path:
    """A checkpoint with the example models' tensor names, optionally another hidden size,
    some tensors dropped or some reshaped; written with safetensors.torch.save_file."""
    folder.mkdir(parents=True)
    config = json.loads((MODELS / "code" / "config.json").read_text())
    config["hidden_size"] = hidden
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, (shape, _) in _example_specs().items():
        if name in drop:
            continue
        shape = (reshape or {}).get(name, [hidden if d == 64 else d for d in shape])
        tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "narrow": write_checkpoint(root / "narrow", hidden=32),
        "wide_mlp": write_checkpoint(root / "wide_mlp", reshape={layer_tensor(3): [96, 64]}),
        "holey": write_checkpoint(root / "holey", drop={layer_tensor(5, "self_attn.v_proj")}),
    }


# --- recipes that check ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quickstart", "selectors", "frankenmerge"])
def test_examples_check(name):
    program = check(parse_file(ROOT / "examples" / f"{name}.merge"))  # paths relative to the recipe's folder
    assert program.saves
    assert {p.name for p in program.checkpoints} == {"base", "code", "math", "prose"}
    assert program.unused == []


def test_frankenmerge_outputs():
    program = check(parse_file(ROOT / "examples" / "frankenmerge.merge"))
    saves = {s.path.name: s for s in program.saves}
    assert list(saves) == ["final", "tall", "ties", "soup"]
    assert all(s.path.parent == ROOT / "out" for s in saves.values())
    assert isinstance(saves["final"].model, WithModel)
    tall = saves["tall"].model
    assert isinstance(tall, StackModel) and tall.num_layers == 12
    assert len(tall.tensors) == 12 * 9 + 3
    assert tall.config()["num_hidden_layers"] == 12
    assert saves["final"].dtype == torch.bfloat16 and saves["ties"].dtype == torch.bfloat16  # the dtype the inputs share
    assert saves["soup"].shard_bytes == 300_000
    assert isinstance(saves["ties"].model, OpModel) and saves["ties"].model.base is not None


def test_golden_recipe_checks():
    program = check(parse_file(FIXTURES / "all_constructs.merge"), base_dir=ROOT)
    saves = {s.path.name: s for s in program.saves}
    assert list(saves) == ["final", "tall", "ties", "soup", "graded"]
    final = saves["final"]
    assert final.dtype == torch.bfloat16 and final.shard_bytes == 2_000_000_000
    assert isinstance(final.tokenizer, CheckpointModel) and final.tokenizer.checkpoint.path == MODELS / "base"
    assert saves["tall"].dtype == torch.float32
    assert saves["tall"].model.num_layers == 6 + 6 + 2 + 2
    assert program.unused == []


def test_save_options():
    program = check_ok("""
        save code to "o1" { dtype = fp16, shard = "500MB", tokenizer = base }
        save math to "o2" { shard = "1.5GiB" }
        save prose to "o3" { shard = 1000 }
    """)
    s1, s2, s3 = program.saves
    assert s1.dtype == torch.float16 and s1.shard_bytes == 500_000_000
    assert s1.tokenizer.checkpoint.path == MODELS / "base"
    assert s2.dtype == torch.bfloat16 and s2.shard_bytes == int(1.5 * 1024**3)
    assert s2.tokenizer.checkpoint.path == MODELS / "math"  # by default, the saved model's own
    assert s3.shard_bytes == 1000


def test_compile_recipe_from_text():
    plan = compile_recipe(NAME, text=recipe('x = slerp(base, code, t = 0.5)\nsave x to "out/x"\n'))
    assert [s.path.name for s in plan.program.saves] == ["x"]
    with pytest.raises(RecipeNameError) as info:
        compile_recipe(NAME, text=recipe('x = slerp(base, cdoe, t = 0.5)\nsave x to "out/x"\n'))
    assert_at(info.value, 1, 17, 4)


# --- names and operators ---------------------------------------------------------------------


def test_unknown_name_with_did_you_mean():
    expect('x = slerp(base, cdoe, t = 0.5)\nsave x to "o"\n', RecipeNameError, 1, 17, "unknown name 'cdoe'",
           "did you mean 'code'?", width=4)


def test_unknown_name_without_a_close_match():
    err = expect('save zzzzzz to "o"\n', RecipeNameError, 1, 6, "unknown name 'zzzzzz'", width=6)
    assert err.hint is None


def test_unknown_operator_with_did_you_mean():
    expect('x = slepr(base, code, t = 0.5)\nsave x to "o"\n', RecipeNameError, 1, 5, "unknown operator 'slepr'",
           "did you mean 'slerp'?", width=5)


def test_operator_used_as_a_value():
    expect('x = linear\nsave x to "o"\n', RecipeTypeError, 1, 5, "'linear' is an operator: call it", width=6)


def test_unknown_parameter_with_did_you_mean():
    err = expect('x = karcher(code, math, weigths = [1, 1])\nsave x to "o"\n', RecipeNameError, 1, 25,
                 "karcher() got an unknown parameter 'weigths'", "did you mean 'weights'?", width=7)
    assert err.render() == (
        f"{NAME}:5:25: error: karcher() got an unknown parameter 'weigths'\n"
        "    x = karcher(code, math, weigths = [1, 1])\n"
        "                            ^^^^^^^\n"
        "hint: did you mean 'weights'?"
    )


def test_unknown_parameter_that_is_an_alias():
    expect('x = ties(code, math, base = base, lamda = 1)\nsave x to "o"\n', RecipeNameError, 1, 35,
           "unknown parameter 'lamda'", "did you mean 'lambda'?", width=5)


def test_name_used_before_its_assignment():
    expect("""
        y = slerp(x, base, t = 0.5)
        x = linear(code, math)
        save y to "o"
    """, RecipeNameError, 1, 11, "unknown name 'x'", f"'x' is assigned later, at {NAME}:6:1; assign it before use")


# --- arity, base, required parameters --------------------------------------------------------


def test_wrong_arity():
    expect('x = slerp(base, code, math, t = 0.5)\nsave x to "o"\n', RecipeTypeError, 1, 5,
           "slerp() takes exactly 2 models, got 3", width=32)
    expect('x = karcher()\nsave x to "o"\n', RecipeTypeError, 1, 5, "karcher() takes 1 or more models, got 0")


def test_required_parameter_missing():
    expect('x = slerp(base, code)\nsave x to "o"\n', RecipeTypeError, 1, 5, "slerp() needs the parameter 't'",
           "t: interpolation factor", width=17)


def test_base_given_to_an_operator_that_takes_none():
    expect('x = slerp(base, code, t = 0.5, base = base)\nsave x to "o"\n', RecipeNameError, 1, 32,
           "slerp() takes no base model", "remove `base = ...`", width=4)


@pytest.mark.parametrize("op", ["task_arithmetic", "ties"])
def test_missing_base(op):
    expect(f'x = {op}(code, math)\nsave x to "o"\n', RecipeTypeError, 1, 5, f"{op}() needs a base model",
           f"add `base = <model>` to {op}(...)")


def test_non_model_argument():
    expect('x = linear(code, 1)\nsave x to "o"\n', RecipeTypeError, 1, 18, "argument 2 of linear() must be a model, not a number")
    expect('x = 1\nsave x to "o"\n', RecipeTypeError, 2, 6, "what `save` writes must be a model, not a number")


# --- parameter values and ranges -------------------------------------------------------------


def test_parameter_out_of_range():
    err = expect('x = slerp(base, code, t = 1.5)\nsave x to "o"\n', RecipeTypeError, 1, 27, "slerp(): t = 1.5", width=3)
    assert "less than or equal to 1" in err.message


def test_gradient_going_out_of_range():
    # [0, 2] over 8 layers reads 2*i/7 at layer i: layer 4 is the first above 1
    err = expect('x = slerp(base, code, t = [0, 2])\nsave x to "o"\n', RecipeTypeError, 1, 27, "slerp(): t = 1.14286", width=6)
    assert "model.layers.4." in err.message


def test_ramp_going_out_of_range():
    expect('x = slerp(base, code, t = ramp(0, 2))\nsave x to "o"\n', RecipeTypeError, 1, 27, "slerp(): t = 1.14286", width=10)


def test_table_entry_out_of_range():
    err = expect('x = slerp(base, code, t = {mlp: 2, _: 0.5})\nsave x to "o"\n', RecipeTypeError, 1, 27, "slerp(): t = 2")
    assert re.search(r"tensor 'model\.layers\.\d+\.mlp\.", err.message), err.message


def test_per_model_list_of_the_wrong_length():
    expect('x = karcher(code, math, prose, weights = [1, 2])\nsave x to "o"\n', RecipeTypeError, 1, 42,
           "'weights' has 2 values for 3 models", "give one value per model", width=6)


def test_per_model_list_of_the_wrong_length_inside_a_table():
    expect('x = karcher(code, math, prose, weights = {mlp: [1, 2], _: 1})\nsave x to "o"\n', RecipeTypeError, 1, 48,
           "'weights' has 2 values for 3 models", width=6)


def test_per_model_value_out_of_range():
    err = expect('x = ties(code, math, base = base, density = [0.5, 0])\nsave x to "o"\n', RecipeTypeError, 1, 45,
                 "ties(): density = [0.5, 0]", width=8)
    assert "greater than 0" in err.message


def test_empty_gradient():
    expect('x = slerp(base, code, t = [])\nsave x to "o"\n', RecipeTypeError, 1, 27, "'t' is an empty list")


def test_string_where_a_number_is_needed():
    expect('x = slerp(base, code, t = "a")\nsave x to "o"\n', RecipeTypeError, 1, 27, "slerp(): t = 'a'")


def test_model_as_a_parameter_is_reported_where_it_is_used():
    # the model was assigned on line 1 of the header; the error belongs to its use as `t`
    expect('x = slerp(base, code, t = base)\nsave x to "o"\n', RecipeTypeError, 1, 27, "'t' cannot be a model")


def test_table_without_a_default_that_misses_tensors():
    expect('x = slerp(base, code, t = {layers[0:4]: 0.2})\nsave x to "o"\n', RecipeTypeError, 1, 27,
           "no entry of 't' matches tensor 'model.embed_tokens.weight'", "add a default entry `_: value`")


def test_ramp_takes_two_numbers():
    expect('x = slerp(base, code, t = ramp(0))\nsave x to "o"\n', RecipeTypeError, 1, 27, "ramp() takes two or more numbers")
    expect('x = slerp(base, code, t = ramp(0, "a"))\nsave x to "o"\n', RecipeTypeError, 1, 35, "ramp() takes numbers, not a string")


# --- selectors and layer ranges --------------------------------------------------------------


def test_selector_matching_nothing_in_a_parameter_table():
    expect('x = slerp(base, code, t = {mlpp: 0.5, _: 0.1})\nsave x to "o"\n', RecipeNameError, 1, 28,
           "selector 'mlpp' in 't' matches no tensor", "did you mean 'mlp'?", width=4)


def test_glob_selector_matching_nothing():
    expect('x = slerp(base, code, t = {"*.mlpp.*": 0.5, _: 0.1})\nsave x to "o"\n', RecipeNameError, 1, 28,
           "selector '*.mlpp.*' in 't' matches no tensor", "tensor names look like", width=10)


def test_layer_selector_matching_nothing():
    expect('x = slerp(base, code, t = {layers[8:10]: 0.2, _: 1})\nsave x to "o"\n', RecipeNameError, 1, 28,
           "selector 'layers[8:10]' in 't' matches no tensor", "no tensor lies in that layer range", width=12)


def test_selector_matching_nothing_in_with():
    expect('x = base with {mlpp: code}\nsave x to "o"\n', RecipeNameError, 1, 16,
           "selector 'mlpp' matches no tensor of the model", "did you mean 'mlp'?", width=4)


def test_layer_range_outside_the_model():
    expect('x = stack(base.layers[0:20])\nsave x to "o"\n', RecipeTypeError, 1, 11,
           "layers[0:20] is outside the model's 8 layers", "valid layer indices are 0 to 7", width=17)
    expect('x = stack(base.layers[4:2])\nsave x to "o"\n', RecipeTypeError, 1, 11, "layers[4:2] is empty")


def test_negative_and_open_layer_slices():
    tall = saved('x = stack(base.layers[:2], code.layers[-2:], math.layers[6:])\nsave x to "o"\n')
    assert [(p.start, p.stop) for p in tall.parts] == [(0, 2), (6, 8), (6, 8)]
    assert tall.num_layers == 6
    assert tall.sources[layer_tensor(2)] == (tall.parts[1].model, layer_tensor(6))


def test_negative_layer_selector_counts_from_the_end():
    # `layers[-2:]` in a table means the last two layers, as `m.layers[-2:]` does in stack;
    # it must not match every layer
    model = saved('x = slerp(base, code, t = {layers[-2:]: 1, _: 0})\nsave x to "o"\n')
    assert [resolved(model, "t", layer_tensor(i)) for i in range(NUM_LAYERS)] == [0, 0, 0, 0, 0, 0, 1, 1]


def test_negative_layer_selector_in_with():
    model = saved('x = base with {layers[-2:]: code}\nsave x to "o"\n')
    sources = [model.source_of(layer_tensor(i)) is model.value for i in range(NUM_LAYERS)]
    assert sources == [True] * 6 + [False] * 2


# --- def -------------------------------------------------------------------------------------


def test_def_is_expanded_at_each_call():
    model = saved("""
        def soup(a, b) = linear(a, b, weights = [1, 3])
        x = soup(code, math)
        save x to "o"
    """)
    assert isinstance(model, OpModel) and model.op.name == "linear"
    assert [m.checkpoint.path.name for m in model.models] == ["code", "math"]
    assert resolved(model, "weights", "model.norm.weight") == [1, 3]


def test_def_with_keyword_arguments():
    model = saved("""
        def mix(a, b) = slerp(a, b, t = 0.25)
        x = mix(b = code, a = base)
        save x to "o"
    """)
    assert [m.checkpoint.path.name for m in model.models] == ["base", "code"]


def test_cycle_through_def():
    expect("""
        def f(a) = g(a)
        def g(a) = f(a)
        x = f(base)
        save x to "o"
    """, RecipeNameError, 3, 5, "cycle through def: f -> g -> f", "a def cannot call itself", width=1)


def test_self_recursive_def():
    expect("""
        def f(a) = linear(f(a), a)
        x = f(base)
        save x to "o"
    """, RecipeNameError, 2, 5, "cycle through def: f -> f")


def test_def_called_with_the_wrong_number_of_args():
    expect("""
        def f(a, b) = linear(a, b)
        x = f(base)
        save x to "o"
    """, RecipeTypeError, 2, 5, "f() takes 2 arguments, got 1", "def f(a, b)", width=7)
    expect("""
        def g(a) = a
        x = g(base, code)
        save x to "o"
    """, RecipeTypeError, 2, 5, "g() takes 1 argument, got 2")


def test_def_called_with_an_unknown_keyword():
    expect("""
        def f(model_a) = model_a
        x = f(modle_a = base)
        save x to "o"
    """, RecipeNameError, 2, 7, "f() has no parameter 'modle_a'", "did you mean 'model_a'?")


def test_def_that_redefines_a_builtin_or_itself():
    expect('def linear(a) = a\nsave base to "o"\n', RecipeNameError, 1, 5, "'linear' is a built-in and cannot be redefined")
    expect('def f(a) = a\ndef f(b) = b\nsave base to "o"\n', RecipeNameError, 2, 5, "'f' is defined twice")


# --- save ------------------------------------------------------------------------------------


def test_unknown_save_option():
    expect('save base to "o" { dtyp = bf16 }\n', RecipeNameError, 1, 20, "save has no option 'dtyp'",
           "did you mean 'dtype'?", width=4)
    expect('save base to "o" { compress = 1 }\n', RecipeNameError, 1, 20, "save has no option 'compress'",
           "options: dtype, shard, tokenizer")


def test_save_option_given_twice():
    expect('save base to "o" { dtype = fp32, dtype = bf16 }\n', RecipeNameError, 1, 34, "option 'dtype' given twice")


@pytest.mark.parametrize(
    "value, message, hint",
    [
        ("bf17", "unknown dtype 'bf17'", "did you mean 'bf16'?"),
        ('"int8"', "unknown dtype 'int8'", "dtype is one of bf16, fp16, fp32"),
        ("16", "dtype must be a name such as bf16", "dtype is one of bf16, fp16, fp32"),
    ],
)
def test_bad_dtype(value, message, hint):
    expect(f'save base to "o" {{ dtype = {value} }}\n', RecipeTypeError, 1, 28, message, hint, width=len(value))


@pytest.mark.parametrize("value", ['"2XB"', '"GB"', '"0GB"', '"0.1B"', "0", "-1", "0.5", "true", "base"])
def test_bad_shard_size(value):
    # 0.5 is no byte count: it must not become a shard size of 0 bytes
    expect(f'save base to "o" {{ shard = {value} }}\n', RecipeTypeError, 1, 28,
           'shard must be a size such as "2GB", "500MB" or a byte count', width=len(value))


def test_tokenizer_must_be_a_model():
    expect('save base to "o" { tokenizer = "x" }\n', RecipeTypeError, 1, 32, "the tokenizer option must be a model, not a string")


def test_two_saves_to_the_same_folder():
    expect('save base to "o"\nsave code to "o"\n', RecipeNameError, 2, 14, "two saves write to 'o'",
           f"the first is at {NAME}:5:1", width=3)
    expect('save base to "out/a"\nsave code to "./out/../out/a"\n', RecipeNameError, 2, 14, "two saves write to")


def test_a_recipe_that_saves_nothing():
    err = check_error("x = linear(code, math)\n", RecipeNameError)
    assert err.message == "the recipe saves nothing" and err.hint == 'add a line `save <model> to "<folder>"`'
    last = len(recipe("x = linear(code, math)\n").rstrip("\n").split("\n"))
    assert (err.span.line, err.span.col) == (last, len("x = linear(code, math)") + 1)  # at the end of the recipe


def test_unused_assignments_are_reported():
    program = check_ok('x = linear(code, math)\ny = linear(code, prose)\nsave x to "o"\n')
    # prose is read only by y, which no save needs
    assert program.unused == ["base", "prose", "y"]


# --- checkpoints and tensor shapes -----------------------------------------------------------


def test_model_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    err = check_error(f'y = model("{missing}")\nsave y to "o"\n', CheckpointError)
    assert_at(err, 1, 11, width=len(str(missing)) + 2)
    assert str(missing) in err.message


def test_model_path_that_is_a_file():
    file = MODELS / "code" / "config.json"
    err = check_error(f'y = model("{file}")\nsave y to "o"\n', CheckpointError)
    assert_at(err, 1, 11)
    assert str(file) in err.message


def test_model_takes_one_path_string():
    expect('x = model("a", "b")\nsave x to "o"\n', RecipeTypeError, 1, 5, "model() takes one argument")
    expect('x = model(1)\nsave x to "o"\n', RecipeTypeError, 1, 11, "model() takes a path string, not a number")


def test_each_checkpoint_is_opened_once():
    program = check_ok(f'again = model("{MODELS / "code"}")\nx = linear(code, again)\nsave x to "o"\n')
    assert len(program.checkpoints) == 4
    x = program.saves[0].model
    assert x.models[0].checkpoint is x.models[1].checkpoint


def test_shape_mismatch_from_headers(odd_models):
    narrow = odd_models["narrow"]
    err = expect(f'n = model("{narrow}")\nx = linear(base, n)\nsave x to "o"\n', RecipeTypeError, 2, 18, "has shape", width=1)
    tensor = re.search(r"tensor '([^']+)'", err.message).group(1)
    with safe_open(str(narrow / "model.safetensors"), "pt") as f:
        narrow_shape = list(f.get_slice(tensor).get_shape())
    base_shape = _example_specs()[tensor][0]
    assert narrow_shape != base_shape
    assert f"has shape {narrow_shape} here but {base_shape} in the first model" in err.message


def test_shape_mismatch_names_the_tensor(odd_models):
    wide = odd_models["wide_mlp"]
    err = expect(f'w = model("{wide}")\nx = slerp(base, w, t = 0.5)\nsave x to "o"\n', RecipeTypeError, 2, 17,
                 f"tensor '{layer_tensor(3)}' has shape [96, 64] here but [128, 64] in the first model")
    assert isinstance(err, RecipeTypeError)
    expect(f'w = model("{wide}")\nx = base with {{layers[3:4]: w}}\nsave x to "o"\n', RecipeTypeError, 2, 29,
           f"tensor '{layer_tensor(3)}' has shape [96, 64]")
    expect(f'w = model("{wide}")\nx = ties(w, base = base)\nsave x to "o"\n', RecipeTypeError, 2, 10,
           f"tensor '{layer_tensor(3)}' has shape [96, 64]")


def test_checkpoint_lacking_a_tensor(odd_models):
    holey = odd_models["holey"]
    missing = layer_tensor(5, "self_attn.v_proj")
    err = expect(f'h = model("{holey}")\nx = linear(base, h)\nsave x to "o"\n', CheckpointError, 2, 18,
                 f"tensor '{missing}' is missing from checkpoint {holey}")
    assert isinstance(err, CheckpointError)


def test_override_lacking_a_tensor(odd_models):
    holey = odd_models["holey"]
    expect(f'h = model("{holey}")\nx = base with {{self_attn: h}}\nsave x to "o"\n', CheckpointError, 2, 27,
           f"the override for 'self_attn' has no tensor '{layer_tensor(5, 'self_attn.v_proj')}'")


# --- several errors at once ------------------------------------------------------------------


def test_several_errors_are_reported_together_without_cascading():
    err = check_error("""
        x = slerp(base, cdoe, t = 0.5)
        y = slerp(x, code, t = 0.5)
        z = slepr(base, code, t = 0.5)
        w = linear(z, y)
        save y to "o"
        save z to "p" { dtype = bf17 }
        save w to "q"
    """, MgcErrors)
    # x fails; y, w and the saves of y, z and w use failed names and add nothing
    assert [(type(e), e.span.line - HEADER_LINES, e.span.col) for e in err.errors] == [
        (RecipeNameError, 1, 17),
        (RecipeNameError, 3, 5),
    ]
    rendered = err.render()
    assert rendered.startswith(f"{NAME}:5:17: error: unknown name 'cdoe'")
    assert f"\n\n{NAME}:7:5: error: unknown operator 'slepr'" in rendered
    assert rendered.endswith("\n\n2 errors.")


def test_errors_in_independent_statements_are_all_reported():
    err = check_error("""
        a = slerp(base, code, t = 2)
        b = karcher(code, math, weigths = [1, 1])
        save base to "o" { dtyp = bf16 }
    """, MgcErrors)
    assert [(e.span.line - HEADER_LINES, e.span.col) for e in err.errors] == [(1, 27), (2, 25), (3, 20)]
    assert [type(e) for e in err.errors] == [RecipeTypeError, RecipeNameError, RecipeNameError]


def test_reassigning_a_failed_name_clears_it():
    err = check_error("""
        x = slerp(base, cdoe, t = 0.5)
        x = linear(code, math)
        y = linear(x, prose)
        save y to "o"
        save q to "p"
    """, MgcErrors)
    assert [(e.span.line - HEADER_LINES, e.message) for e in err.errors] == [
        (1, "unknown name 'cdoe'"), (5, "unknown name 'q'"),
    ]


# --- parameter resolution --------------------------------------------------------------------


def test_gradient_list_resolves_across_layers():
    model = saved('x = slerp(base, code, t = [0, 1])\nsave x to "o"\n')
    assert isinstance(model, OpModel) and model.num_layers == NUM_LAYERS
    for i in range(NUM_LAYERS):
        for part in ("mlp.up_proj", "self_attn.q_proj", "input_layernorm"):
            assert resolved(model, "t", layer_tensor(i, part)) == pytest.approx(i / 7)
    for tensor in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert resolved(model, "t", tensor) == 0
    assert set(model.resolved) == set(model.tensors)


def test_gradient_with_several_points():
    model = saved('x = slerp(base, code, t = [0, 1, 0])\nsave x to "o"\n')
    expected = [0, 2 / 7, 4 / 7, 6 / 7, 6 / 7, 4 / 7, 2 / 7, 0]
    assert [resolved(model, "t", layer_tensor(i)) for i in range(NUM_LAYERS)] == pytest.approx(expected)


def test_ramp_equals_a_two_point_list():
    ramp = saved('x = slerp(base, code, t = ramp(0.2, 0.8))\nsave x to "o"\n')
    listed = saved('x = slerp(base, code, t = [0.2, 0.8])\nsave x to "o"\n')
    assert ramp.resolved == listed.resolved
    assert resolved(ramp, "t", layer_tensor(7)) == pytest.approx(0.8)


def test_scalar_resolves_everywhere():
    model = saved('x = slerp(base, code, t = 0.25)\nsave x to "o"\n')
    assert {p.t for p in model.resolved.values()} == {0.25}


def test_table_first_match_wins():
    mlp_first = saved('x = slerp(base, code, t = {mlp: 0.1, "up_proj": 0.9, _: 0.5})\nsave x to "o"\n')
    up_first = saved('x = slerp(base, code, t = {"up_proj": 0.9, mlp: 0.1, _: 0.5})\nsave x to "o"\n')
    assert resolved(mlp_first, "t", layer_tensor(2)) == 0.1
    assert resolved(up_first, "t", layer_tensor(2)) == 0.9
    assert resolved(up_first, "t", layer_tensor(2, "mlp.down_proj")) == 0.1
    assert resolved(up_first, "t", layer_tensor(2, "self_attn.q_proj")) == 0.5


def test_table_default_entry():
    model = saved('x = slerp(base, code, t = {_: 0.3, mlp: 0.9})\nsave x to "o"\n')
    assert {p.t for p in model.resolved.values()} == {0.3}  # `_` first shadows everything


def test_glob_and_substring_keys():
    model = saved("""
        x = slerp(base, code, t = {"*.mlp.*": 0.1, "model.layers.?.self_attn.q_proj.weight": 0.2,
                                   "k_proj": 0.3, norm: 0.4, _: 0.5})
        save x to "o"
    """)
    assert resolved(model, "t", layer_tensor(0, "mlp.gate_proj")) == 0.1
    assert resolved(model, "t", layer_tensor(5, "self_attn.q_proj")) == 0.2
    assert resolved(model, "t", layer_tensor(5, "self_attn.k_proj")) == 0.3
    assert resolved(model, "t", layer_tensor(5, "input_layernorm")) == 0.4
    assert resolved(model, "t", "model.norm.weight") == 0.4
    assert resolved(model, "t", layer_tensor(5, "self_attn.v_proj")) == 0.5
    assert resolved(model, "t", "model.embed_tokens.weight") == 0.5


def test_layer_range_keys():
    model = saved('x = slerp(base, code, t = {layers[:2]: 0.1, layers[2:4]: 0.3, layers[6:]: 0.9, _: 0.5})\nsave x to "o"\n')
    assert [resolved(model, "t", layer_tensor(i)) for i in range(NUM_LAYERS)] == [0.1, 0.1, 0.3, 0.3, 0.5, 0.5, 0.9, 0.9]
    assert resolved(model, "t", "lm_head.weight") == 0.5


def test_table_entries_may_be_gradients():
    model = saved('x = slerp(base, code, t = {mlp: [0, 1], _: 0.5})\nsave x to "o"\n')
    assert resolved(model, "t", layer_tensor(7)) == 1
    assert resolved(model, "t", layer_tensor(0)) == 0
    assert resolved(model, "t", layer_tensor(7, "self_attn.o_proj")) == 0.5


def test_per_model_table_and_list():
    table = saved('x = karcher(code, math, prose, weights = {mlp: [1, 2, 3], _: [4, 5, 6]})\nsave x to "o"\n')
    assert resolved(table, "weights", layer_tensor(0)) == [1, 2, 3]
    assert resolved(table, "weights", "model.norm.weight") == [4, 5, 6]
    mixed = saved('x = karcher(code, math, prose, weights = [[0, 1], 1, {mlp: 2, _: 3}])\nsave x to "o"\n')
    for i in range(NUM_LAYERS):
        assert resolved(mixed, "weights", layer_tensor(i)) == pytest.approx([i / 7, 1, 2])
    assert resolved(mixed, "weights", "lm_head.weight") == [0, 1, 3]


def test_per_model_scalar_is_repeated():
    model = saved('x = ties(code, math, prose, base = base, density = 0.5)\nsave x to "o"\n')
    assert resolved(model, "density", "model.norm.weight") == [0.5, 0.5, 0.5]
    assert resolved(model, "weights", "model.norm.weight") is None  # the schema's default
    assert model.inputs[0] is model.base and len(model.inputs) == 4


def test_alias_parameter_and_booleans():
    model = saved('x = task_arithmetic(code, math, base = base, lambda = 0.5, normalize = true)\nsave x to "o"\n')
    params = model.resolved["model.norm.weight"]
    assert params.lambda_ == 0.5 and params.normalize is True


def test_parameter_value_from_a_name():
    model = saved('g = [0, 1]\nx = slerp(base, code, t = g)\nsave x to "o"\n')
    assert resolved(model, "t", layer_tensor(7)) == 1


def test_with_overrides():
    model = saved('x = base with { "model.embed_tokens.weight": code, layers[0:2]: math } with { mlp: prose }\nsave x to "o"\n')
    assert isinstance(model, WithModel) and isinstance(model.value, WithModel)
    assert model.source_of(layer_tensor(5)).checkpoint.path.name == "prose"
    inner = model.value
    assert inner.source_of("model.embed_tokens.weight").checkpoint.path.name == "code"
    assert inner.source_of(layer_tensor(1, "self_attn.q_proj")).checkpoint.path.name == "math"
    assert inner.source_of(layer_tensor(2, "self_attn.q_proj")) is inner.value
    assert set(model.tensors) == set(inner.value.tensors)


# --- Selector --------------------------------------------------------------------------------


EMBED = "model.embed_tokens.weight"


LLAMA = layer_map({"num_hidden_layers": 12}, [f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)])


def test_default_selector_matches_everything():
    s = Selector("default")
    assert all(s.matches(n, LLAMA) for n in (EMBED, layer_tensor(3), "anything"))
    assert str(s) == "_"


def test_pattern_selector_is_a_substring():
    s = Selector("pattern", "mlp")
    assert s.matches(layer_tensor(0), LLAMA) and s.matches(layer_tensor(7, "mlp.down_proj"), LLAMA)
    assert not s.matches(layer_tensor(0, "self_attn.q_proj"), LLAMA) and not s.matches(EMBED, LLAMA)
    assert not Selector("pattern", "MLP").matches(layer_tensor(0), LLAMA)  # case-sensitive
    assert Selector("pattern", EMBED).matches(EMBED, LLAMA)
    assert str(s) == "mlp"


def test_pattern_selector_with_glob_characters_matches_the_whole_name():
    assert Selector("pattern", "*.mlp.*").matches(layer_tensor(0), LLAMA)
    assert not Selector("pattern", "mlp.*").matches(layer_tensor(0), LLAMA)  # a glob is anchored
    assert Selector("pattern", "model.layers.?.mlp.up_proj.weight").matches(layer_tensor(7), LLAMA)
    assert not Selector("pattern", "model.layers.?.mlp.up_proj.weight").matches("model.layers.12.mlp.up_proj.weight", LLAMA)
    brackets = Selector("pattern", "model.layers.[0-2].*")
    assert [brackets.matches(layer_tensor(i), LLAMA) for i in range(4)] == [True, True, True, False]


def test_layers_selector():
    s = Selector("layers", start=2, stop=4)
    assert [s.matches(layer_tensor(i), LLAMA) for i in range(6)] == [False, False, True, True, False, False]
    assert not s.matches(EMBED, LLAMA) and not s.matches("model.norm.weight", LLAMA)
    assert str(s) == "layers[2:4]"
    head, tail = Selector("layers", stop=2), Selector("layers", start=6)
    assert [head.matches(layer_tensor(i), LLAMA) for i in range(8)] == [True, True] + [False] * 6
    assert [tail.matches(layer_tensor(i), LLAMA) for i in range(8)] == [False] * 6 + [True, True]
    assert (str(head), str(tail), str(Selector("layers"))) == ("layers[:2]", "layers[6:]", "layers[:]")


def test_layers_selector_on_other_naming_families():
    s = Selector("layers", start=3, stop=4)
    for family in ("transformer.h.{}.attn.c_attn.weight", "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight",
                   "model.decoder.layers.{}.fc1.weight", "transformer.blocks.{}.ffn.weight", "encoder.layer.{}.x.weight"):
        layers = layer_map({}, [family.format(i) for i in range(6)] + ["transformer.wte.weight"])
        assert [s.matches(family.format(i), layers) for i in range(6)] == [False, False, False, True, False, False]
        assert not s.matches("transformer.wte.weight", layers)


def test_selector_equality_ignores_the_span():
    span = parse("x = 1\n", NAME).statements[0].span
    assert Selector("pattern", "mlp", span=span) == Selector("pattern", "mlp")
    assert Selector("pattern", "mlp") != Selector("pattern", "attn")


def test_table_lookup_is_first_match():
    one, two, three = (Num(v, None) for v in (1, 2, 3))
    table = TableV(((Selector("pattern", "up_proj"), one), (Selector("pattern", "mlp"), two),
                    (Selector("default"), three)), None)
    assert table.lookup(layer_tensor(0), LLAMA) is one
    assert table.lookup(layer_tensor(0, "mlp.down_proj"), LLAMA) is two
    assert table.lookup(EMBED, LLAMA) is three
    assert TableV(((Selector("pattern", "mlp"), one),), None).lookup(EMBED, LLAMA) is None


# --- the CLI ---------------------------------------------------------------------------------


def write_recipe(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(recipe(body))
    return path


def test_cli_check_ok(tmp_path):
    path = write_recipe(tmp_path, "good.merge", f'x = slerp(base, code, t = 0.5)\nsave x to "{tmp_path / "out"}"\n')
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{path}: ok (1 output, 4 checkpoints)")
    assert "warning: assigned but never saved: math, prose" in result.output
    assert not (tmp_path / "out").exists()  # check writes nothing


def test_cli_check_error(tmp_path):
    path = write_recipe(tmp_path, "bad.merge", f'x = slerp(base, cdoe, t = 0.5)\nsave x to "{tmp_path / "out"}"\n')
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 1
    expected = (
        f"{path}:5:17: error: unknown name 'cdoe'\n"
        "    x = slerp(base, cdoe, t = 0.5)\n"
        "                    ^^^^\n"
        "hint: did you mean 'code'?\n"
    )
    assert result.output == expected  # the error goes to stderr, which the runner's output includes


def test_cli_check_syntax_error(tmp_path):
    path = tmp_path / "syntax.merge"
    path.write_text("x = slerp(a b)\n")
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith(f"{path}:1:13: error: unexpected 'b'")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_check_missing_recipe(tmp_path):
    result = CliRunner().invoke(main, ["check", str(tmp_path / "nope.merge")])
    assert result.exit_code == 1
    assert "cannot read recipe" in result.output


def test_syntax_error_is_not_a_check_error():
    # parse errors surface before checking, as RecipeSyntaxError
    with pytest.raises(RecipeSyntaxError):
        compile_recipe(NAME, text="x = (\n")


def test_a_model_named_in_quotes_gets_a_hint():
    err = check_error('save code to "o" { tokenizer = "base" }\n', RecipeTypeError)
    assert "must be a model, not a string" in err.message
    assert err.hint == "a model is named without quotes: write base"
    assert_at(err, 1, 32, 6)
