"""Start-up: the commands that only read a recipe, compile it or list the operators never import torch (about a second of
start-up). Each is run in a fresh interpreter, which then says whether torch was imported."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def _imports_torch(args: list[str]) -> bool:
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom mgc.cli import main\n"
        f"r = CliRunner().invoke(main, {args!r})\nassert r.exit_code == 0, r.output\nprint('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("args", [
    ["--version"], ["ops"], ["ops", "karcher"], ["ops", "--markdown"], ["fmt", "--check", "examples/quickstart.merge"],
])
def test_commands_that_do_not_merge_do_not_import_torch(args):
    assert not _imports_torch(args)


@pytest.mark.parametrize("args", [
    ["check", "examples/quickstart.merge"], ["plan", "examples/quickstart.merge"],
    ["plan", "--explain", "examples/quickstart.merge"], ["graph", "examples/quickstart.merge"],
    ["graph", "--unoptimized", "examples/quickstart.merge"],
    ["check", "examples/search.merge"], ["plan", "examples/search.merge"],  # what a search computes once
])
def test_commands_that_compile_a_recipe_do_not_import_torch(args):
    """The compiler's dtypes are mgc/core/dtypes.py's, not torch's: checking and planning never import it."""
    assert not _imports_torch(args)


@pytest.mark.parametrize("module", ["mgc", "mgc.cli"])
def test_every_command_runs_as_a_module(module):
    """`python -m mgc` (torchrun's form) and `python -m mgc.cli` list the commands registered in mgc/cli_models.py."""
    out = subprocess.run([sys.executable, "-m", module, "search", "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0 and "--data" in out.stdout, out.stderr
