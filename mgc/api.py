"""The public API: compile a recipe to a plan, and run it."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from mgc.compiler.check import Program, check
from mgc.compiler.search_space import bound_text
from mgc.core.errors import OutputError, RecipeTypeError
from mgc.core.paths import recipe_folder
from mgc.compiler.lower import lower
from mgc.compiler.outputs import check_output_paths, program_inputs
from mgc.compiler.passes import PASSES, optimize, schedule_blocks
from mgc.compiler.plan import Plan
from mgc.gcpause import gc_paused
from mgc.grammar import parse, parse_file

if TYPE_CHECKING:
    from mgc.runtime.execute import RunStats


def compile_recipe(
    recipe: str | Path, *, text: Optional[str] = None, allow_pickle: bool = False, output: Optional[str | Path] = None,
    optimize_graph: bool = True, values: Optional[Mapping[str, float]] = None,
) -> Plan:
    """Parse, check, lower and optimize a recipe file (or `text`, reported under the name `recipe`).

    The recipe's relative paths (model folders, fisher() data, save folders) resolve against the folder of
    `recipe`, also for `text` (so `text` under the name "recipes/r.merge" reads "models/a" as
    recipes/models/a). `output` (the CLI's -o) is relative to the working directory.

    `values` binds free parameters (`search(...)`) by name: the plan is that of the recipe with those calls
    replaced by the values, and that recipe is the one its outputs record."""
    with gc_paused():
        tree = parse(text, str(recipe)) if text is not None else parse_file(recipe)
        if values:
            tree = bind_recipe(tree, values, allow_pickle)
        program = check(tree, allow_pickle=allow_pickle, base_dir=recipe_folder(recipe))
        if output is not None:
            _redirect(program, Path(output))
        check_output_paths(program.saves, program_inputs(program), None if text is not None else Path(recipe), Path.cwd())
        optimized = optimize(lower(program), passes=PASSES if optimize_graph else (schedule_blocks,))
        return Plan(tree, program, optimized.graph, optimized.schedule, optimized.reports)


def bind_recipe(tree, values: Mapping[str, float], allow_pickle: bool = False):
    """The recipe with the search(...) calls that `values` names ({"merged.t": 0.7}) replaced by those numbers."""
    program = check(tree, allow_pickle=allow_pickle, base_dir=recipe_folder(tree.source.name), values=values)
    return parse(bound_text(tree.source.text, program.domains, program.assignment), tree.source.name)


def require_bound(plan: Plan) -> None:
    """A run needs a value for every free parameter."""
    free = list(plan.program.free.values())
    if free:
        names = ", ".join(f"{d.name} = {d}" for d in free)
        raise RecipeTypeError(
            f"the recipe has {len(free)} free parameter{'s' if len(free) != 1 else ''}: {names}", free[0].span,
            f"find values with `mgc search {plan.recipe.source.name} --data FILE`, or give them: "
            f"mgc run {plan.recipe.source.name} " + " ".join(f"--set {d.name}={d.default:g}" for d in free),
        )


def run(
    recipe: str | Path, *, text: Optional[str] = None, device: str = "auto", force: bool = False,
    progress: bool = False, allow_pickle: bool = False, output: Optional[str | Path] = None,
    max_memory: Optional[int] = None, values: Optional[Mapping[str, float]] = None,
) -> tuple[Plan, RunStats]:
    plan = compile_recipe(
        recipe, text=text, allow_pickle=allow_pickle, output=output, values=values,
    )
    require_bound(plan)
    from mgc.runtime.execute import execute  # torch: `mgc check` and `mgc plan` never import it

    prepare(plan, device=device, progress=progress, force=force)
    return plan, execute(plan, device=device, force=force, progress=progress, max_memory=max_memory)


def prepare(plan: Plan, *, device: str = "auto", progress: bool = False, force: Optional[bool] = None) -> dict[Path, str]:
    """What a plan needs before `execute`: each `fisher(...)` and `moe(...)` gate it reads is computed into its
    cache folder unless cached, and that folder is registered as a checkpoint. Returns {cache folder: "cached" | "computed"}.
    `compile_recipe` (check, plan) never computes; call this between it and `execute`. With `force` given, the
    output folders are checked first (as `execute` does), so a refused target costs no Fisher computation.
    Before either, the shards of hub checkpoints (hf://) holding tensors the plan reads are downloaded, at the
    commit pinned when the recipe was checked (runtime/hub_fetch.py)."""
    from mgc.compiler.hub_plan import hub_loads
    from mgc.runtime.hub_fetch import fetch_hub_inputs
    from mgc.runtime.target import check_target

    fishers = getattr(plan.program, "fishers", None)
    gates = getattr(plan.program, "gates", None)
    if force is not None and (fishers or gates or hub_loads(plan)):
        for save in plan.program.saves:
            check_target(save.path, force, save.span)
    fetch_hub_inputs(plan, progress=progress)
    done: dict[Path, str] = {}
    if fishers:
        from mgc.fisher import materialise

        done.update(materialise(plan, device=device, progress=progress))
    if gates:  # moe()'s routers
        from mgc.gates import materialise_gates

        done.update(materialise_gates(plan, device=device))
    return done


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
