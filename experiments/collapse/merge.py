"""Merging the first m experts with mgc: one recipe per method, hyper-parameters fixed across m."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import mgc.api

# method -> (operator call template, its hyper-parameters as written in the recipe). Equal weights
# everywhere, as the paper; "{experts}" is the list of expert names and "base" the shared base model.
# Defaults not listed are mgc's, which are mergekit 0.1.5's (see docs/operators.md).
METHODS: dict[str, str] = {
    "linear": "linear({experts})",  # weights 1 each, normalize = true: the plain mean (lerp / model soup)
    "task_arithmetic": "task_arithmetic({experts}, base = base, lambda = 1.0)",  # base + Σ δᵢ (normalize = false)
    "ties": "ties({experts}, base = base, density = 0.5)",  # normalize = true, lambda = 1
    "dare_ties": "dare_ties({experts}, base = base, density = 0.5, seed = 0)",  # rescale = true, normalize = false
    "model_stock": "model_stock({experts}, base = base)",
    "multislerp": "multislerp({experts}, base = base)",  # on the task vectors, weights normalised
    "karcher": "karcher({experts}, max_iter = 10, tol = 1e-5)",  # spherical-proxy Karcher mean, mgc's defaults
}


def recipe(method: str, base: Path, experts: list[tuple[str, Path]]) -> str:
    lines = [f'base = model("{Path(base).resolve()}")']  # absolute: the recipe is given as text, the output by -o
    lines += [f'{name} = model("{Path(path).resolve()}")' for name, path in experts]
    call = METHODS[method].format(experts=", ".join(name for name, _ in experts))
    lines += [f"merged = {call}", 'save merged to "merged" { dtype = fp32 }']
    return "\n".join(lines) + "\n"


def merge(method: str, base: Path, experts: list[tuple[str, Path]], out: Path) -> float:
    """Runs the merge with mgc on the CPU into `out` (replaced if present). Returns the merge's seconds."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = recipe(method, base, experts)
    t0 = time.perf_counter()
    mgc.api.run(f"{method}.merge", text=text, output=out, device="cpu", force=True)
    seconds = time.perf_counter() - t0
    (out / "recipe.merge").write_text(text)
    return seconds
