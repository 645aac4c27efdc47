"""Golden plans: for each optimization pass, tests/fixtures/plans/PASS.merge is a small recipe on which
the pass does its work, and PASS.expected is exactly what `mgc plan --explain PASS.merge` prints for it,
run from the repository root. schedule_blocks changes no counts, so its expectation also lists the
schedule's blocks in order. A further test keeps the `mgc plan examples/quickstart.merge` output that
README.md shows in step with the real one.

To regenerate the expectations after a deliberate change, run

    MGC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_plans.py

and read the diff (README.md is never rewritten: update its block by hand).
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from mgc.api import compile_recipe
from mgc.cli import main
from mgc.compiler.ir import Apply, Load, Save
from mgc.compiler.passes import PASSES

REPO = Path(__file__).resolve().parents[1]
PLANS = REPO / "tests" / "fixtures" / "plans"
RECIPES = sorted(PLANS.glob("*.merge"))
UPDATE = os.environ.get("MGC_UPDATE_GOLDEN") == "1"
README_INTRO = "`mgc plan examples/quickstart.merge` prints:"


def mgc_plan(*args: str) -> str:
    result = CliRunner().invoke(main, ["plan", *args])
    assert result.exit_code == 0, result.output
    return result.output


def schedule(recipe: str) -> str:
    """The blocks of the schedule in order, each with its load/apply/save nodes."""
    plan = compile_recipe(recipe)
    graph, blocks = plan.graph, plan.schedule.blocks
    lines = ["", "schedule (block: load/apply/save nodes):"]
    for block, nodes in itertools.groupby(plan.schedule.order, key=blocks.__getitem__):
        kinds = [type(graph.payload(n)) for n in nodes]
        counts = "/".join(f"{kinds.count(k):>3}" for k in (Load, Apply, Save))
        lines.append(f"  {'other' if block == -1 else f'layer {block}':8s} {counts}")
    return "\n".join(lines) + "\n"


def test_every_pass_has_a_fixture():
    assert {p.__name__ for p in PASSES} == {r.stem for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_plan(recipe: Path, repo_root):
    relative = str(recipe.relative_to(REPO))
    got = mgc_plan("--explain", relative)
    if recipe.stem == "schedule_blocks":
        got += schedule(relative)
    expected = recipe.with_suffix(".expected")
    if UPDATE:
        expected.write_text(got, encoding="utf-8")
    assert expected.exists(), f"no {expected.name}: run with MGC_UPDATE_GOLDEN=1 to write it"
    assert got == expected.read_text(encoding="utf-8")


def readme_plan() -> str:
    lines = (REPO / "README.md").read_text(encoding="utf-8").split("\n")
    start = lines.index(README_INTRO)
    assert lines[start + 1] == "" and lines[start + 2] == "```"
    end = lines.index("```", start + 3)
    return "\n".join(lines[start + 3:end]) + "\n"


def test_readme_quickstart_plan(repo_root):
    # README's paths (the recipe, out/quickstart) are relative to the repository root, as here
    assert mgc_plan("examples/quickstart.merge") == readme_plan()
