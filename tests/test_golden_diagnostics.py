"""Golden diagnostics: each tests/fixtures/invalid/NAME.merge is a recipe with one mistake, and
NAME.expected holds exactly what mgc reports for it (file:line:col: error: message, the line, the
caret, the hint). Recipes name the example checkpoints relative to the repository root, and are
compiled from there.

An absolute path inside a message (an output folder over an input) is written with the repository
root replaced by `<repo>`, so the expectations hold on any checkout.

To regenerate the expectations after a deliberate change to a message, run

    MGC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_diagnostics.py

and read the diff: each one should still point at the right place with a helpful hint.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mgc.api import compile_recipe
from mgc.core.errors import MgcError

REPO = Path(__file__).resolve().parents[1]
INVALID = REPO / "tests" / "fixtures" / "invalid"
RECIPES = sorted(INVALID.glob("*.merge"))
UPDATE = os.environ.get("MGC_UPDATE_GOLDEN") == "1"


def render(recipe: Path) -> str:
    with pytest.raises(MgcError) as info:
        compile_recipe(recipe.relative_to(REPO))
    return info.value.render().replace(os.path.realpath(REPO), "<repo>") + "\n"


def test_there_are_invalid_fixtures():
    assert len(RECIPES) >= 30


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_diagnostic(recipe: Path, repo_root):
    got = render(recipe)
    expected = recipe.with_suffix(".expected")
    if UPDATE:
        expected.write_text(got, encoding="utf-8")
    assert expected.exists(), f"no {expected.name}: run with MGC_UPDATE_GOLDEN=1 to write it"
    assert got == expected.read_text(encoding="utf-8")
