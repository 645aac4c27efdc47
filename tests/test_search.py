"""`mgc search` on tiny models whose answer is known by construction (tests/search_models.py): each expert is trained
on text of its own domain, so on code text slerp(base, code, t) is best near t = 1, and a weighted merge of the
three experts is best with the code expert's weight the largest."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner

from mgc.cli import main
from mgc.core.errors import MgcError
from mgc.search import prepare_search
from mgc.runtime.memory import TensorCache, run_in_memory

from conftest import load_folder

pytest.importorskip("optuna")
search_models = pytest.importorskip("search_models")


@pytest.fixture(scope="module")
def pool(tmp_path_factory, one_thread) -> Path:
    root = tmp_path_factory.mktemp("pool")
    search_models.make_models(root)
    (root / "code.txt").write_text(search_models.domain_text("code", 20, seed=99))
    mixed = [search_models.domain_text(d, n, seed=90 + n) for d, n in (("code", 14), ("math", 3), ("prose", 3))]
    (root / "mixed.txt").write_text("\n".join(mixed))
    return root


def _search(recipe: Path, data: Path, out: Path, *args) -> list[dict]:
    result = CliRunner().invoke(main, ["search", str(recipe), "--data", str(data), "-o", str(out), "--device", "cpu",
                                       "-q", *map(str, args)])
    assert result.exit_code == 0, result.output
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f)), result.output


def test_slerp_toward_the_expert_of_the_data_finds_t_near_one(pool, tmp_path):
    recipe = pool / "slerp.merge"
    recipe.write_text('base = model("base")\ncode = model("code")\nsave slerp(base, code, t = search(0, 1)) to "out"\n')
    rows, output = _search(recipe, pool / "code.txt", tmp_path / "r", "--trials", 12)
    assert len(rows) == 12 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    best = (tmp_path / "r" / "best.merge").read_text()
    t = float(best.split("t = ")[1].split(")")[0])
    assert t > 0.8, best
    for name in ("objective.png", "importances.png", "report.md"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    # the report: the best trial on held-out data, beside the defaults and each input
    assert "| best (save.t=" in output and "| recipe defaults |" in output and "| input " in output
    table = {line.split("|")[1].strip(): line.split("|")[2:4] for line in output.splitlines() if line.startswith("| ")}
    best_row = next(v for k, v in table.items() if k.startswith("best"))
    assert float(best_row[0]) < float(table["recipe defaults"][0]) and best_row[1].strip() != "-"
    # best.merge runs from its own folder and writes what the best trial scored
    run = CliRunner().invoke(main, ["run", str(tmp_path / "r" / "best.merge"), "-o", str(tmp_path / "m"), "-q", "--device", "cpu"])
    assert run.exit_code == 0, run.output


def test_weights_search_gives_the_dominant_data_its_expert(pool, tmp_path):
    recipe = pool / "weights.merge"
    recipe.write_text(
        'code = model("code")\nmath = model("math")\nprose = model("prose")\n'
        "save linear(code, math, prose, weights = [search(0, 1), search(0, 1), search(0, 1)]) to \"out\"\n"
    )
    rows, _ = _search(recipe, pool / "mixed.txt", tmp_path / "r", "--trials", 30)
    best = min((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: float(r["perplexity"]))
    w = [float(best[f"save.weights[{i}]"]) for i in range(3)]
    assert w[0] > 0.5 * sum(w), w


def test_what_no_free_parameter_changes_is_computed_once(pool, tmp_path):
    recipe = pool / "shared.merge"
    recipe.write_text(
        'base = model("base")\ncode = model("code")\nmath = model("math")\n'
        "save slerp(base, karcher(code, math), t = search(0, 1)) to \"out\"\n"
    )
    rows, _ = _search(recipe, pool / "code.txt", tmp_path / "r", "--trials", 5, "--no-prune")
    setup = prepare_search(recipe)
    n = len(setup.plan({}).program.saves[0].model.tensors)
    computed = [int(r["nodes_computed"]) for r in rows]
    # the first trial: 3 loads, one karcher and one slerp per tensor; the others: 1 load (the base) and one
    # slerp per tensor, the karcher results reused
    assert computed[0] == 5 * n and computed[1:] == [2 * n] * 4, computed
    assert [int(r["nodes_reused"]) for r in rows[1:]] == [n] * 4


def test_a_trial_in_memory_equals_the_checkpoint_a_run_writes(pool, tmp_path):
    recipe = pool / "shared.merge"
    recipe.write_text(
        'base = model("base")\ncode = model("code")\nmath = model("math")\n'
        "save slerp(base, karcher(code, math), t = search(0, 1)) to \"out\"\n"
    )
    setup = prepare_search(recipe)
    key = next(iter(setup.domains))
    from mgc.compiler.search_plan import invariant

    cache = TensorCache(invariant(setup.plan({}).graph, setup.plan({key: 0.9}).graph).keep)
    run_in_memory(setup.plan({key: 0.2}), cache, "cpu")  # fills the cache
    assert cache.values
    again = run_in_memory(setup.plan({key: 0.7}), cache, "cpu")
    assert again.reused and "karcher" not in again.computed
    result = CliRunner().invoke(main, ["run", str(recipe), "--set", "save.t=0.7", "-o", str(tmp_path / "o"), "-q",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written = load_folder(tmp_path / "o")
    assert written.keys() == again.tensors.keys()
    assert all(written[k].equal(again.tensors[k]) for k in written)


def test_a_study_in_sqlite_resumes(pool, tmp_path):
    recipe = pool / "slerp2.merge"
    recipe.write_text('base = model("base")\ncode = model("code")\nsave slerp(base, code, t = search(0, 1)) to "out"\n')
    study = f"sqlite:///{tmp_path / 'study.db'}"
    _search(recipe, pool / "code.txt", tmp_path / "r", "--trials", 3, "--study", study)
    rows, _ = _search(recipe, pool / "code.txt", tmp_path / "r", "--trials", 2, "--study", study, "--force")
    assert len(rows) == 5 and [r["note"] for r in rows[:3]] == ["an earlier run"] * 3


@pytest.mark.parametrize("body, args, message", [
    ('save model("base") to "o"', (), "no free parameters"),
    ('b = model("base")\nc = model("code")\nsave slerp(b, c, t = search(0, 1)) to "o"\nsave b to "o2"', (), "saves 2"),
    ('b = model("base")\nc = model("code")\nsave slerp(b, c, t = search(0, 1)) to "o"', ("--metric", "accuracy"), "records"),
    ('b = model("base")\nc = model("code")\nsave slerp(b, c, t = search(0, 1)) to "o"', ("--metric", "kl"), "--teachers"),
])
def test_search_refuses_what_it_cannot_do(pool, tmp_path, body, args, message):
    recipe = pool / "bad.merge"
    recipe.write_text(body + "\n")
    result = CliRunner().invoke(main, ["search", str(recipe), "--data", str(pool / "code.txt"), "-o", str(tmp_path / "r"),
                                       *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "r").exists()


def test_results_never_go_over_other_files(pool, tmp_path):
    recipe = pool / "slerp3.merge"
    recipe.write_text('base = model("base")\ncode = model("code")\nsave slerp(base, code, t = search(0, 1)) to "out"\n')
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["search", str(recipe), "--data", str(pool / "code.txt"), "-o", str(tmp_path / "r"),
                                       "--force"])
    assert result.exit_code == 1 and "not empty" in result.output
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    with pytest.raises(MgcError):
        from mgc.search import run_search

        run_search(recipe, pool / "code.txt", out=pool / "base", log=lambda s: None)


@pytest.mark.parametrize("sampler", ["cmaes", "random"])
def test_every_sampler_runs(pool, tmp_path, sampler):
    recipe = pool / f"{sampler}.merge"
    recipe.write_text(
        'code = model("code")\nmath = model("math")\n'
        "save linear(code, math, weights = [search(0.1, 1, log = true), search([0.5, 1])]) to \"out\"\n"
    )
    rows, _ = _search(recipe, pool / "code.txt", tmp_path / "r", "--trials", 4, "--sampler", sampler, "--seed", 3)
    assert len(rows) == 4
    assert all(0.1 <= float(r["save.weights[0]"]) <= 1 and float(r["save.weights[1]"]) in (0.5, 1) for r in rows)


def test_the_example_recipe_searches(tmp_path, one_thread):
    from conftest import EXAMPLES

    rows, output = _search(EXAMPLES / "search.merge", EXAMPLES / "data" / "code.txt", tmp_path / "r", "--trials", 3)
    assert len(rows) == 3 and "experts_t" in rows[0] and "| recipe defaults |" in output


def test_values_that_cannot_be_merged_fail_their_trial_not_the_search(pool, tmp_path):
    """Each domain's ends pass the check, but both weights at 0 cannot be normalized: that trial fails, with the
    message in trials.csv and no traceback, and the search goes on."""
    recipe = pool / "zero.merge"
    recipe.write_text('code = model("code")\nmath = model("math")\n'
                      "save linear(code, math, weights = [search([1, 0]), search([1, 0])]) to \"out\"\n")
    result = CliRunner().invoke(main, ["search", str(recipe), "--data", str(pool / "code.txt"), "-o", str(tmp_path / "r"),
                                       "--trials", 8, "--sampler", "random", "--seed", 1, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "failed: linear(): weights = [0, 0]" in result.output
    rows = list(csv.DictReader(open(tmp_path / "r" / "trials.csv")))
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert failed and all("weights sum to 0" in r["note"] for r in failed)
    assert any(r["state"] == "COMPLETE" for r in rows)


def test_search_prepares_fisher_caches_and_moe_gates_as_a_run_does(pool, tmp_path):
    """fisher() and moe() values are computed before a run (mgc.api.prepare); a search prepares them too."""
    recipe = pool / "fisher_search.merge"
    recipe.write_text(
        'code = model("code")\nmath = model("math")\nfc = fisher(code, data = "code.txt", samples = 4)\n'
        'fm = fisher(math, data = "code.txt", samples = 4)\n'
        "save fisher_merge(code, math, fisher = [fc, fm], weights = [1, search(0.5, 2)]) to \"out\"\n"
    )
    rows, _ = _search(recipe, pool / "code.txt", tmp_path / "r", "--trials", 2)
    assert len(rows) == 2 and rows[0]["state"] == "COMPLETE" and rows[1]["state"] in ("COMPLETE", "PRUNED")


def test_a_free_parameter_that_changes_no_tensor_is_refused(pool, tmp_path):
    recipe = pool / "config_only.merge"
    recipe.write_text(
        'base = model("base")\ncode = model("code")\nmath = model("math")\n'
        "save moe(base, experts = [code, math], gate = random(seed = 0), experts_per_token = search([1, 2])) to \"o\"\n"
    )
    result = CliRunner().invoke(main, ["search", str(recipe), "--data", str(pool / "code.txt"), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and "changes no tensor of the output" in result.output, result.output
    assert not (tmp_path / "r").exists()


def test_a_study_of_another_search_is_not_mixed_in(pool, tmp_path):
    recipe = pool / "fp.merge"
    recipe.write_text('base = model("base")\ncode = model("code")\nsave slerp(base, code, t = search(0, 1)) to "out"\n')
    study = f"sqlite:///{tmp_path / 'study.db'}"
    _search(recipe, pool / "code.txt", tmp_path / "r", "--trials", 1, "--study", study)
    recipe.write_text('base = model("base")\ncode = model("code")\nsave slerp(base, code, t = search(0, 0.1)) to "out"\n')
    result = CliRunner().invoke(main, ["search", str(recipe), "--data", str(pool / "code.txt"), "-o", str(tmp_path / "r2"),
                                       "--study", study])
    assert result.exit_code == 1 and "made by another search" in result.output, result.output
    bad = CliRunner().invoke(main, ["search", str(recipe), "--data", str(pool / "code.txt"), "-o", str(tmp_path / "r3"),
                                    "--study", "notaurl"])
    assert bad.exit_code == 1 and "--study notaurl" in bad.output and "internal error" not in bad.output


def test_results_never_go_over_the_data(pool, tmp_path):
    recipe = pool / "slerp4.merge"
    recipe.write_text('base = model("base")\ncode = model("code")\nsave slerp(base, code, t = search(0, 1)) to "out"\n')
    folder = tmp_path / "d"
    folder.mkdir()
    data = folder / "report.md"
    data.write_text((pool / "code.txt").read_text())
    before = data.read_bytes()
    result = CliRunner().invoke(main, ["search", str(recipe), "--data", str(data), "-o", str(folder), "--force"])
    assert result.exit_code == 1 and "overlaps the input" in result.output
    assert data.read_bytes() == before
