"""Provenance (runtime/provenance.py, docs/provenance.md): every output folder holds a model card (README.md) and,
in each shard's safetensors header, the recipe, mgc's version and the identity of each input; `mgc recipe` prints
the recipe back, and running it again writes the same tensors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mgc.runtime.provenance as provenance
from mgc.api import run
from mgc.cli import main
from mgc.core.checkpoint import INDEX_FILE
from mgc.stdlib import OPERATORS

from conftest import without_provenance

try:  # the hub stand-in and its checkpoints, for the hf:// test (needs transformers)
    from test_hub import hub, zoo  # noqa: F401
except (ImportError, pytest.skip.Exception):
    pass

RECIPE = """# a Karcher mean of two experts, then slerp back toward the base
base = model("models/base")
code = model("models/code")
math = model("models/math")
experts = karcher(code, math, weights = [2, 1])
save slerp(base, experts, t = ramp(0.3, 0.7)) to "out/merged" { dtype = bf16, shard = "300KB" }
"""


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _metadata(file: Path) -> dict:
    with safe_open(str(file), "pt") as f:
        return f.metadata()


@pytest.fixture
def merged(models, tmp_path):
    """RECIPE run from tmp_path (beside the private copy of the example models): (recipe file, output folder)."""
    recipe = tmp_path / "r.merge"
    recipe.write_text(RECIPE)
    run(recipe, device="cpu")
    return recipe, tmp_path / "out" / "merged"


def test_the_model_card_loads_with_its_fields(merged, models):
    recipe, out = merged
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [str((models / n).resolve()) for n in ("base", "code", "math")]
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mgc"]
    assert f"```merge\n{RECIPE}```" in card.text
    for op in ("karcher", "slerp"):
        assert f"`{op}`: {OPERATORS[op].reference}" in card.text
    assert provenance.mgc_version() in card.text


def test_every_shard_carries_the_recipe_and_the_inputs(merged, models):
    recipe, out = merged
    shards = _shards(out)
    assert len(shards) > 1 and (out / INDEX_FILE).is_file()
    for shard in shards:
        meta = _metadata(shard)  # safetensors reads it: every value a string
        assert all(isinstance(v, str) for v in meta.values())
        assert meta["format"] == "pt"
        assert meta["mgc.recipe"] == RECIPE
        assert meta["mgc.version"] == provenance.mgc_version()
        assert meta["mgc.recipe_folder"] == str(recipe.parent)
        inputs = json.loads(meta["mgc.inputs"])
        assert [i["model"] for i in inputs] == [str((models / n).resolve()) for n in ("base", "code", "math")]
        assert all(len(i["headers_sha256"]) == 64 for i in inputs)
    # the tensors load as ever
    assert load_file(shards[0])


def test_an_input_that_changes_changes_its_identity(models, tmp_path):
    recipe = tmp_path / "r.merge"
    recipe.write_text(RECIPE.replace("out/merged", "out/one"))
    run(recipe, device="cpu")
    file = models / "code" / "model.safetensors"
    save_file({k: v.to(torch.float16) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    recipe.write_text(RECIPE.replace("out/merged", "out/two"))
    run(recipe, device="cpu")
    one, two = (json.loads(_metadata(_shards(tmp_path / "out" / n)[0])["mgc.inputs"]) for n in ("one", "two"))
    assert [i["model"] for i in one] == [i["model"] for i in two]
    changed = [a["model"] for a, b in zip(one, two) if a["headers_sha256"] != b["headers_sha256"]]
    assert changed == [str((models / "code").resolve())]


def test_mgc_recipe_prints_the_recipe_and_running_it_again_writes_the_same_tensors(merged, tmp_path):
    recipe, out = merged
    result = CliRunner().invoke(main, ["recipe", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == RECIPE
    assert str(recipe.parent) in result.stderr  # where its relative paths are relative to
    again = recipe.parent / "again.merge"  # saved in the recipe's own folder, as the note says
    again.write_text(result.stdout)
    result = CliRunner().invoke(main, ["run", str(again), "-o", str(tmp_path / "again"), "-q"])
    assert result.exit_code == 0, result.output
    a, b = _shards(out), _shards(tmp_path / "again")
    assert [p.name for p in a] == [p.name for p in b]
    for x, y in zip(a, b):
        assert without_provenance(x.read_bytes()) == without_provenance(y.read_bytes())  # header and tensors
        assert _metadata(x)["mgc.recipe"] == _metadata(y)["mgc.recipe"]
        assert _metadata(x)["mgc.inputs"] == _metadata(y)["mgc.inputs"]


def test_a_long_recipe_is_stored_once(models, tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "RECIPE_INLINE_BYTES", 100)
    recipe = tmp_path / "r.merge"
    recipe.write_text(RECIPE)
    run(recipe, device="cpu")
    out = tmp_path / "out" / "merged"
    first, *rest = _shards(out)
    assert rest
    assert _metadata(first)["mgc.recipe"] == RECIPE
    for shard in rest:
        meta = _metadata(shard)
        assert "mgc.recipe" not in meta and meta["mgc.recipe_in"] == first.name
        assert meta["mgc.recipe_sha256"] == _metadata(first)["mgc.recipe_sha256"]
    result = CliRunner().invoke(main, ["recipe", str(out)])
    assert result.exit_code == 0 and result.stdout == RECIPE


@pytest.mark.parametrize("what", ["not_mgc", "no_checkpoint", "missing"])
def test_mgc_recipe_on_a_folder_mgc_did_not_write(models, tmp_path, what):
    folder = {"not_mgc": models / "base", "no_checkpoint": tmp_path, "missing": tmp_path / "nothing"}[what]
    result = CliRunner().invoke(main, ["recipe", str(folder)])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_the_card_is_written_for_an_input_with_a_readme(models, tmp_path):
    """mgc copies config, tokenizer and generation_config files only: an input's README.md stays where it is."""
    (models / "base" / "README.md").write_text("# the base model's own card\n")
    recipe = tmp_path / "r.merge"
    recipe.write_text(RECIPE)
    run(recipe, device="cpu")
    card = (tmp_path / "out" / "merged" / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "own card" not in card
    assert (models / "base" / "README.md").read_text() == "# the base model's own card\n"


def test_a_hub_checkpoint_is_named_by_its_repository():
    class Revision:
        repo_id, sha = "org/name", "0" * 40

    class Remote:
        revision = Revision()
        hub_id = f"hf://org/name@{'0' * 40}"
        path = Path("/cache/snapshots/0000")

    assert provenance.card_id(Remote()) == "org/name"
    assert provenance.identity(Remote()) == f"hf://org/name@{'0' * 40}"


def test_mgc_recipe_absolute_runs_from_any_folder(merged, tmp_path):
    recipe, out = merged
    result = CliRunner().invoke(main, ["recipe", "--absolute", str(out)])
    assert result.exit_code == 0, result.output
    folder = str(recipe.parent)
    assert f'model("{folder}/models/base")' in result.stdout and f'to "{folder}/out/merged"' in result.stdout
    assert result.stdout.startswith("# a Karcher mean")  # comments and layout stay
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "again.merge").write_text(result.stdout)
    result = CliRunner().invoke(main, ["run", str(elsewhere / "again.merge"), "-o", str(tmp_path / "again"), "-q"])
    assert result.exit_code == 0, result.output
    a, b = _shards(out), _shards(tmp_path / "again")
    assert [p.name for p in a] == [p.name for p in b]
    for x, y in zip(a, b):
        assert without_provenance(x.read_bytes()) == without_provenance(y.read_bytes())


def test_absolute_paths_leave_hub_ids_and_absolute_paths_alone():
    text = ('a = model("hf://org/name@main")  # "models/x"\nb = model("/abs/b")\nc = model("rel/c")\n'
            'f = fisher(c, data = "d.txt")\nsave linear(a, b, c) to "out" { tokenizer = a }\n')
    got = provenance.absolute_paths(text, "r.merge", "/recipes")
    assert got == text.replace('"rel/c"', '"/recipes/rel/c"').replace('"d.txt"', '"/recipes/d.txt"') \
        .replace('to "out"', 'to "/recipes/out"')


def test_hub_inputs_are_named_by_id_and_commit(tmp_path, request):
    if "hub" not in globals():
        pytest.skip("needs transformers (tests/test_hub.py's checkpoints)")
    standin, models = request.getfixturevalue("hub"), request.getfixturevalue("zoo")
    sha_a, sha_b = standin.push("org/a", models / "a"), standin.push("org/b", models / "b")
    recipe = tmp_path / "r.merge"
    recipe.write_text(f'save slerp(model("hf://org/a"), model("hf://org/b"), t = 0.3) to "{tmp_path / "out"}"\n')
    run(recipe, device="cpu")
    out = tmp_path / "out"
    assert ModelCard.load(out / "README.md").data.base_model == ["org/a", "org/b"]
    local = tmp_path / "local"
    local.mkdir()
    (local / "r.merge").write_text(f'save slerp(model("{models / "a"}"), model("{models / "b"}"), t = 0.3) '
                                   f'to "{tmp_path / "local-out"}"\n')
    run(local / "r.merge", device="cpu")
    for shard in _shards(out):
        inputs = json.loads(_metadata(shard)["mgc.inputs"])
        assert [i["model"] for i in inputs] == [f"hf://org/a@{sha_a}", f"hf://org/b@{sha_b}"]
        # the same files on the hub and on disk have the same headers hash
        same = json.loads(_metadata(_shards(tmp_path / "local-out")[0])["mgc.inputs"])
        assert [i["headers_sha256"] for i in inputs] == [i["headers_sha256"] for i in same]
