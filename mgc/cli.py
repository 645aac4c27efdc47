"""The `mgc` command line."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from mgc.compiler.errors import MgcError

DEVICES = click.Choice(["auto", "cpu", "cuda"])


def _fail(e: MgcError) -> None:
    click.echo(e.render(), err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mgc")
def main() -> None:
    """mgc, the merge-graph compiler: merge fine-tuned LLMs from a .merge recipe."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the (only) output here instead; with several saves, under this folder.")
@click.option("--device", type=DEVICES, default="auto", show_default=True, help="Where merge math runs; auto = cuda when available.")
@click.option("--force", is_flag=True, help="Replace output folders that exist and are not empty.")
@click.option("--dry-run", is_flag=True, help="Check and plan, print the plan, write nothing.")
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints, which can run code: only for trusted files.")
@click.option("--max-memory", metavar="SIZE", help="Cap on tensor memory, e.g. 8GB; the run is refused if the plan needs more.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def run(recipe, output, device, force, dry_run, allow_pickle, max_memory, quiet):
    """Merge: run RECIPE and write its saves."""
    from mgc.api import compile_recipe
    from mgc.runtime.execute import execute
    from mgc.compiler.plan import format_bytes

    from mgc.compiler.check import parse_size

    cap = None
    if max_memory is not None:
        cap = parse_size(max_memory)
        if cap is None:
            raise click.BadParameter(f"not a size: {max_memory!r} (e.g. 8GB, 512MiB)", param_hint="--max-memory")
    try:
        plan = compile_recipe(recipe, allow_pickle=allow_pickle, output=output)
        if dry_run:
            click.echo(plan.summary())
            return
        stats = execute(plan, device=device, force=force, progress=not quiet, max_memory=cap)
    except MgcError as e:
        _fail(e)
    if not quiet:
        for s in plan.program.saves:
            click.echo(f"wrote {s.path}")
        click.echo(
            f"{stats.tensors_written} tensors, {format_bytes(stats.bytes_read)} read, "
            f"{format_bytes(stats.bytes_written)} written in {stats.seconds:.2f} s"
        )


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints.")
def check(recipe, allow_pickle):
    """Check RECIPE without reading tensor data."""
    from mgc.api import compile_recipe

    try:
        plan = compile_recipe(recipe, allow_pickle=allow_pickle)
    except MgcError as e:
        _fail(e)
    n = len(plan.program.saves)
    click.echo(f"{recipe}: ok ({n} output{'s' if n != 1 else ''}, {len(plan.program.checkpoints)} checkpoints)")
    if plan.program.unused:
        click.echo(f"warning: assigned but never saved: {', '.join(plan.program.unused)}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--explain", is_flag=True, help="List the rewrite rules that fired in each pass.")
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints.")
def plan(recipe, explain, allow_pickle):
    """Print the optimized plan of RECIPE: passes, work, bytes, peak memory."""
    from mgc.api import compile_recipe

    try:
        p = compile_recipe(recipe, allow_pickle=allow_pickle)
    except MgcError as e:
        _fail(e)
    click.echo(p.summary(explain=explain))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--unoptimized", is_flag=True, help="The graph as lowered, before the passes.")
def graph(recipe, unoptimized):
    """Print the tensor graph of RECIPE as DOT (render with `dot -Tsvg`)."""
    from mgc.api import compile_recipe

    try:
        p = compile_recipe(recipe, optimize_graph=not unoptimized)
    except MgcError as e:
        _fail(e)
    click.echo(p.to_dot())


@main.command()
@click.argument("name", required=False)
@click.option("--markdown", is_flag=True, help="The operator table in Markdown, as in the README.")
def ops(name, markdown):
    """List the merge operators, or show one operator's parameters."""
    from mgc.compiler.errors import RecipeNameError, did_you_mean
    from mgc.opdocs import describe, inputs_text, markdown_table
    from mgc.stdlib import OPERATORS

    if markdown:
        click.echo(markdown_table())
        return
    if name is None:
        width = max(map(len, OPERATORS))
        for op in OPERATORS.values():
            click.echo(f"{op.name:<{width}}  {inputs_text(op):<26}  {op.doc}")
        return
    op = OPERATORS.get(name)
    if op is None:
        _fail(RecipeNameError(f"unknown operator '{name}'", hint=did_you_mean(name, OPERATORS) or "`mgc ops` lists them"))
    click.echo(describe(op))


if __name__ == "__main__":  # pragma: no cover
    main()
