"""An optimization never changes a result: for every operator, the optimized graph writes the same bytes as
the graph as lowered, on recipes built to make every pass fire (repeated subexpressions, stacks that repeat
layers, identical inputs, nested linears, trivial parameters)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mgc.api import compile_recipe
from mgc.runtime.execute import execute
from mgc.stdlib import OPERATORS

M = str(Path(__file__).resolve().parents[1] / "examples" / "models")
HEADER = f"""
base = model("{M}/base")
code = model("{M}/code")
math = model("{M}/math")
prose = model("{M}/prose")
# the same layers twice: equal inputs under different output names
sb = stack(base.layers[0:3], base.layers[0:3], base.layers[3:5])
sc = stack(code.layers[0:3], code.layers[0:3], code.layers[3:5])
sm = stack(math.layers[0:3], math.layers[0:3], math.layers[3:5])
sp = stack(prose.layers[0:3], prose.layers[0:3], prose.layers[3:5])
"""

REQUIRED = {"slerp": "t = 0.3", "nearswap": "t = 0.01"}


def _calls(op) -> list[str]:
    """Calls of `op` that exercise CSE (the same call twice), folding (identical inputs, trivial values)
    and stacks that repeat layers."""
    n = max(op.min_models, 2 if op.max_models is None or op.max_models >= 2 else 1)
    models = ["sc", "sm", "sp"][:n] if n <= 3 else ["sc"] * n
    params = [REQUIRED[op.name]] if op.name in REQUIRED else []
    if op.base != "none":
        params.append("base = sb")
    if "fisher" in op.model_params:
        params.append(f"fisher = [{', '.join(['fa', 'fb', 'fa'][:len(models)])}]")
    args = ", ".join(models + params)
    same = ", ".join(([models[0]] * len(models)) + params)
    calls = [f"{op.name}({args})", f"{op.name}({args})", f"{op.name}({same})"]
    if op.name == "slerp":
        calls += ["slerp(sc, sm, t = 0)", "slerp(sc, sm, t = 1)", "slerp(sc, sc, t = 0.3)"]
    if op.name == "linear":
        calls += ["linear(sc)", "linear(linear(sc, sm), sp)", "linear(linear(sc, sm, weights = [0.3, 0.7]), sp, weights = [2, 1])",
                  "linear(sc, sc, weights = [0.3, 0.7])"]
    if op.name == "karcher":
        calls += ["karcher(sc)", "karcher(sc, sc, weights = [1, 3])"]
    if op.name == "passthrough":
        calls += ["passthrough(sc, scale = 1)"]
    return calls


def header(tmp_path: Path) -> str:
    """HEADER, and `fa`, `fb`: stand-ins for Fisher models (non-negative, the base's and code's magnitudes)."""
    for name, source in (("fa", "base"), ("fb", "code")):
        folder = tmp_path / name
        if not folder.exists():
            folder.mkdir()
            shutil.copy(Path(M) / source / "config.json", folder)
            tensors = {}
            for f in (Path(M) / source).glob("*.safetensors"):
                tensors.update({k: v.float().abs() for k, v in load_file(f).items()})
            save_file(tensors, folder / "model.safetensors")
    return HEADER + f'fa = model("{tmp_path}/fa")\nfb = model("{tmp_path}/fb")\n'


def _run(recipe: Path, out: Path, optimize: bool) -> dict[str, torch.Tensor]:
    plan = compile_recipe(recipe, output=out, optimize_graph=optimize)
    execute(plan, device="cpu", progress=False)
    tensors = {}
    for folder in sorted([p for p in out.iterdir() if p.is_dir()] + [out]):
        for f in sorted(folder.glob("*.safetensors")):
            tensors.update({f"{folder.name}/{k}": v for k, v in load_file(f).items()})
    return tensors


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_optimized_graph_writes_the_bytes_of_the_unoptimized_one(name, repo_root, tmp_path, one_thread):
    op = OPERATORS[name]
    # float32 outputs: a fold that is only right up to rounding shows in the last bits
    saves = "\n".join(f'save {call} to "o{k}" {{ dtype = fp32 }}' for k, call in enumerate(_calls(op)))
    recipe = tmp_path / "r.merge"
    recipe.write_text(header(tmp_path) + saves + "\n")
    fast = _run(recipe, tmp_path / "fast", optimize=True)
    slow = _run(recipe, tmp_path / "slow", optimize=False)
    assert fast.keys() == slow.keys()
    differ = [k for k in fast if not torch.equal(fast[k].view(torch.uint8), slow[k].view(torch.uint8))]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}"


def test_random_operators_get_their_own_masks_in_repeated_layers(repo_root, tmp_path, one_thread):
    """dare_ties over a stack that repeats layers 0-2 as 3-5: layers 3-5 draw their own masks."""
    recipe = tmp_path / "r.merge"
    recipe.write_text(header(tmp_path) + 'save dare_ties(sc, sm, base = sb, density = 0.5) to "o"\n')
    out = _run(recipe, tmp_path / "out", optimize=True)
    a, b = out["out/model.layers.0.mlp.up_proj.weight"], out["out/model.layers.3.mlp.up_proj.weight"]
    assert not torch.equal(a, b)
