"""A recipe's paths (model folders, fisher() data, save folders) resolve against the recipe's own folder, so
`mgc run path/to/recipe.merge` does the same from any working directory; `-o` stays relative to the working
directory; a recipe given as text resolves against the folder of the name it is given under."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from mgc.api import compile_recipe
from mgc.cli import main
from mgc.core.errors import CheckpointError, MgcError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RECIPE = 'base = model("../models/base")\ncode = model("../models/code")\nsave linear(base, code) to "../out/m"\n'


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """tmp/proj/{models -> examples/models, data -> examples/data, recipes/r.merge}; the working directory is
    tmp/elsewhere, beside it."""
    proj = tmp_path / "proj"
    (proj / "recipes").mkdir(parents=True)
    (proj / "models").symlink_to(EXAMPLES / "models")
    (proj / "data").symlink_to(EXAMPLES / "data")
    (proj / "recipes" / "r.merge").write_text(RECIPE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return proj


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_recipe_runs_the_same_from_another_working_directory(project, tmp_path):
    result = _cli("run", "-q", "--device", "cpu", "../proj/recipes/r.merge")
    assert result.exit_code == 0, result.output
    assert (project / "out" / "m" / "config.json").is_file()
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_plan_shows_outputs_relative_to_the_working_directory(project):
    result = _cli("plan", "../proj/recipes/r.merge")
    assert result.exit_code == 0, result.output
    assert f"  {(project / 'out' / 'm').resolve()}  (75 tensors)" in result.output  # not inside it: absolute


def test_dash_o_is_relative_to_the_working_directory(project, tmp_path):
    result = _cli("run", "-q", "--device", "cpu", "-o", "here/m", "../proj/recipes/r.merge")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere" / "here" / "m" / "config.json").is_file()
    assert not (project / "out").exists()


def test_a_text_recipe_resolves_against_the_folder_of_its_name(project):
    plan = compile_recipe(project / "recipes" / "not-on-disk.merge", text=RECIPE)
    assert {p.name for p in plan.program.checkpoints} == {"base", "code"}
    assert plan.program.saves[0].path == (project / "out" / "m").resolve()
    with pytest.raises(MgcError) as info:  # under a bare name: the working directory, where no models are
        compile_recipe("r.merge", text=RECIPE)
    assert "r.merge:1:14: error: no checkpoint folder at '../models/base'" in info.value.render()


def test_fisher_data_is_relative_to_the_recipe(project):
    (project / "recipes" / "f.merge").write_text(
        'code = model("../models/code")\nfc = fisher(code, data = "../data/code.txt", samples = 2)\n'
        'save fisher_merge(code, code, fisher = [fc, fc]) to "../out/f"\n'
    )
    plan = compile_recipe("../proj/recipes/f.merge")
    (fisher,) = plan.program.fishers.values()
    assert fisher.data == (EXAMPLES / "data" / "code.txt").resolve()


def test_a_missing_path_says_where_it_was_looked_for(project):
    (project / "recipes" / "bad.merge").write_text('a = model("models/base")\nsave a to "../out/x"\n')
    with pytest.raises(CheckpointError) as info:
        compile_recipe("../proj/recipes/bad.merge")
    assert info.value.hint.startswith(
        f"looked for '{project / 'recipes' / 'models' / 'base'}' (paths are relative to the recipe's folder)"
    )
    (project / "recipes" / "bad.merge").write_text(
        'a = model("../models/base")\nfc = fisher(a, data = "code.txt")\nsave fisher_merge(a, a, fisher = [fc, fc]) to "../out/x"\n'
    )
    with pytest.raises(CheckpointError) as info:
        compile_recipe("../proj/recipes/bad.merge")
    assert f"looked for '{project / 'recipes' / 'code.txt'}'" in info.value.hint


@pytest.mark.parametrize("recipe", sorted(EXAMPLES.glob("*.merge")) + sorted(EXAMPLES.glob("methods/*.merge")),
                         ids=lambda p: p.stem)
def test_every_example_checks_from_any_working_directory(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = compile_recipe(recipe)
    assert all(s.path.is_relative_to(REPO / "out") for s in plan.program.saves)  # README: outputs land in ./out
