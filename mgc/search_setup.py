"""What `mgc search` and `mgc plan` share about a recipe with free parameters: the checked recipe (`Setup`), the plan
at given values, and the part of the graph that no free parameter changes. Without torch: `mgc plan` of a search
recipe prints what a search would compute once, and never imports it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mgc.compiler.check import Checker, check
from mgc.compiler.lower import lower
from mgc.compiler.outputs import check_output_paths, program_inputs
from mgc.compiler.passes import optimize
from mgc.compiler.plan import Plan
from mgc.compiler.search_plan import Invariant, invariant, other_values
from mgc.core.errors import RecipeTypeError
from mgc.core.paths import recipe_folder
from mgc.grammar import parse_file


@dataclass
class Setup:
    """What every trial shares: the checked recipe, the data split, the scorer and the model."""

    tree: object
    program: object
    domains: dict
    base_dir: Path
    allow_pickle: bool
    device: object
    inputs: object = None

    def plan(self, assignment: dict) -> Plan:
        """The optimized plan of the recipe with `assignment` ({domain key: value}), the other domains at their
        defaults; its checkpoints are opened once for all trials."""
        program = Checker(self.tree, self.allow_pickle, self.base_dir, assignment, self.inputs).run()
        program.assignment = assignment
        opt = optimize(lower(program))
        return Plan(self.tree, program, opt.graph, opt.schedule, opt.reports)


def prepare_search(recipe, allow_pickle: bool = False, device: str = "auto") -> Setup:
    tree = parse_file(recipe)
    base_dir = recipe_folder(recipe)
    program = check(tree, allow_pickle=allow_pickle, base_dir=base_dir)
    if not program.free:
        raise RecipeTypeError(
            f"{recipe} has no free parameters: nothing to search", None,
            "write search(low, high) or search([a, b, c]) where a number goes, e.g. t = search(0, 1)",
        )
    if len(program.saves) != 1:
        raise RecipeTypeError(f"mgc search evaluates one output, and {recipe} saves {len(program.saves)}",
                              program.saves[1].span, "keep one save in the recipe you search")
    if getattr(program.saves[0], "adapter", None) is not None:
        raise RecipeTypeError("mgc search scores a model, and this save writes a LoRA adapter", program.saves[0].span,
                              "search the merge itself, then extract the adapter from the best recipe")
    check_output_paths(program.saves, program_inputs(program), Path(recipe), Path.cwd())
    from mgc.core.devices import resolve_device  # torch

    setup = Setup(tree, program, dict(program.domains), base_dir, allow_pickle, resolve_device(device))
    setup.inputs = Checker(tree, allow_pickle, base_dir).inputs
    return setup




def sharing_lines(recipe, allow_pickle: bool = False) -> list[str]:
    """`mgc plan`'s lines on what a search of `recipe` computes once."""
    from mgc.compiler.search_plan import plan_lines

    tree = parse_file(recipe)
    setup = Setup(tree, None, {}, recipe_folder(recipe), allow_pickle, None)
    setup.inputs = Checker(tree, allow_pickle, setup.base_dir).inputs
    setup.domains = setup.plan({}).program.free
    try:
        return plan_lines(invariant_part(setup)[1], len(setup.domains))
    except RecipeTypeError as e:  # mgc plan still prints the plan; mgc search refuses with this error
        return ["", f"search: {e.message} ({e.span}): mgc search would refuse this recipe"]


def invariant_part(setup: Setup) -> tuple[Plan, Invariant]:
    """The plan at the defaults, and what it shares with the plans that give each domain another value."""
    at_defaults = setup.plan({})
    saved = save_meanings(at_defaults.graph)
    others = []
    for key, value in other_values(setup.domains).items():
        other = setup.plan({key: value})
        if save_meanings(other.graph) == saved:
            d = setup.domains[key]
            raise RecipeTypeError(
                f"the free parameter {d.name} changes no tensor of the output", d.span,
                "mgc search scores the merged tensors; a value that changes only the config (experts_per_token, "
                "pad_to_multiple_of) or nothing at all cannot be chosen by them: write a number here",
            )
        others.append(other.graph)
    return at_defaults, invariant(at_defaults.graph, *others)


def save_meanings(graph) -> frozenset:
    from mgc.compiler.ir import Save, meanings

    m = meanings(graph)
    return frozenset(m[n] for n in graph.of_kind(Save))
