"""The public API: compile a recipe to a plan, and run it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mgc.compiler.check import Program, check
from mgc.core.errors import OutputError
from mgc.core.paths import recipe_folder
from mgc.compiler.lower import lower
from mgc.compiler.outputs import check_output_paths, program_inputs
from mgc.compiler.passes import PASSES, optimize, schedule_blocks
from mgc.compiler.plan import Plan
from mgc.gcpause import gc_paused
from mgc.grammar import parse, parse_file
from mgc.runtime.execute import RunStats, execute


def compile_recipe(
    recipe: str | Path, *, text: Optional[str] = None, allow_pickle: bool = False, output: Optional[str | Path] = None,
    optimize_graph: bool = True,
) -> Plan:
    """Parse, check, lower and optimize a recipe file (or `text`, reported under the name `recipe`).

    The recipe's relative paths (model folders, fisher() data, save folders) resolve against the folder of
    `recipe`, also for `text` (so `text` under the name "recipes/r.merge" reads "models/a" as
    recipes/models/a). `output` (the CLI's -o) is relative to the working directory."""
    with gc_paused():
        tree = parse(text, str(recipe)) if text is not None else parse_file(recipe)
        program = check(tree, allow_pickle=allow_pickle, base_dir=recipe_folder(recipe))
        if output is not None:
            _redirect(program, Path(output))
        check_output_paths(program.saves, program_inputs(program), None if text is not None else Path(recipe), Path.cwd())
        optimized = optimize(lower(program), passes=PASSES if optimize_graph else (schedule_blocks,))
        return Plan(tree, program, optimized.graph, optimized.schedule, optimized.reports)


def run(
    recipe: str | Path, *, text: Optional[str] = None, device: str = "auto", force: bool = False,
    progress: bool = False, allow_pickle: bool = False, output: Optional[str | Path] = None,
    max_memory: Optional[int] = None,
) -> tuple[Plan, RunStats]:
    plan = compile_recipe(
        recipe, text=text, allow_pickle=allow_pickle, output=output,
    )
    prepare(plan, device=device, progress=progress, force=force)
    return plan, execute(plan, device=device, force=force, progress=progress, max_memory=max_memory)


def prepare(plan: Plan, *, device: str = "auto", progress: bool = False, force: Optional[bool] = None) -> dict[Path, str]:
    """What a plan needs before `execute`: each `fisher(...)` it reads is computed into its cache folder unless
    cached, and that folder is registered as a checkpoint. Returns {cache folder: "cached" | "computed"}.
    `compile_recipe` (check, plan) never computes; call this between it and `execute`. With `force` given, the
    output folders are checked first (as `execute` does), so a refused target costs no Fisher computation.
    Before either, the shards of hub checkpoints (hf://) holding tensors the plan reads are downloaded, at the
    commit pinned when the recipe was checked (runtime/hub_fetch.py)."""
    from mgc.compiler.hub_plan import hub_loads
    from mgc.runtime.hub_fetch import fetch_hub_inputs
    from mgc.runtime.target import check_target

    fishers = getattr(plan.program, "fishers", None)
    if force is not None and (fishers or hub_loads(plan)):
        for save in plan.program.saves:
            check_target(save.path, force, save.span)
    fetch_hub_inputs(plan, progress=progress)
    if not fishers:
        return {}
    from mgc.fisher import materialise

    return materialise(plan, device=device, progress=progress)


def _redirect(program: Program, output: Path) -> None:
    """`-o DIR`: the only save goes to DIR; with several, each goes to DIR/<its folder name>."""
    output = output.resolve()
    if len(program.saves) == 1:
        program.saves[0].path = output
        return
    names = [s.path.name for s in program.saves]
    if len(set(names)) != len(names):
        raise OutputError(f"-o cannot place {len(names)} outputs under one folder: their folder names repeat")
    for s in program.saves:
        s.path = output / s.path.name
