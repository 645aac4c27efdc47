"""The `mgc` command line."""
from __future__ import annotations

import errno
import gc
import os
import sys
from pathlib import Path

import click

from mgc.core.errors import MgcError

DEVICES = click.Choice(["auto", "cpu", "cuda"])


EX_SOFTWARE = 70  # sysexits.h: an internal software error, here a bug in mgc
SIGNAL_STATUSES = (129, 130, 143)  # 128 + SIGHUP, SIGINT, SIGTERM: runtime/signals.py's exits


def _fail(e: MgcError) -> None:
    click.echo(e.render(), err=True)
    sys.exit(1)


def _warn(plan) -> None:
    for w in plan.program.warnings:
        click.echo(w.render(), err=True)


def _internal_error(e: Exception) -> None:
    """Any exception but an MgcError is a bug: a short message and EX_SOFTWARE, the traceback with MGC_DEBUG=1."""
    if os.environ.get("MGC_DEBUG") == "1":
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    try:
        text = str(e).strip().split("\n")[0]
    except Exception:  # a broken __str__ must not hide the report
        text = ""
    if len(text) > 300:
        text = text[:300] + "..."
    click.echo(f"mgc: internal error (a bug in mgc, please report it): {type(e).__name__}{': ' + text if text else ''}", err=True)
    if os.environ.get("MGC_DEBUG") != "1":
        click.echo("mgc: set MGC_DEBUG=1 to print the traceback", err=True)
    sys.exit(EX_SOFTWARE)


def _compiler():
    """mgc.api's compile_recipe, imported with the garbage collector paused (its imports build many objects: a
    fifth of `mgc check`'s start-up went to collections). Neither it nor the plan imports torch (tests/test_startup.py)."""
    from mgc.gcpause import gc_paused

    with gc_paused():
        from mgc.api import compile_recipe

        gc.freeze()  # and they live as long as the process: no collection (the one at exit included) walks them again
    return compile_recipe


class _Main(click.Group):
    """The `mgc` group: an MgcError that escapes a command exits 1, any other exception is an internal error."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click reports these itself: usage errors (2), --help, ...
        except MgcError as e:
            _fail(e)
        except OSError as e:
            if e.errno == errno.EPIPE:  # `mgc graph r.merge | head`: click exits quietly
                raise
            _internal_error(e)
        except Exception as e:  # not BaseException: KeyboardInterrupt and SystemExit pass through
            _internal_error(e)

    def __call__(self, *args, **kwargs):
        """The `mgc` process (click.testing calls main() instead): stopped by a signal, it has cleaned up by the time
        the exit status reaches here, and leaves at once, skipping the interpreter's finalization, where a daemon
        thread's unwinding through torch's C++ code was seen to abort the process (status -6 instead of 143)."""
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as e:
            if isinstance(e.code, int) and e.code in SIGNAL_STATUSES:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(e.code)
            raise


def _values(ctx, param, pairs) -> dict[str, float]:
    """`--set NAME=VALUE` pairs: values for a recipe's free parameters (search(...))."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None:
            raise click.BadParameter(f"{pair!r} is not NAME=NUMBER (e.g. merged.t=0.5)", param_hint="--set")
        out[name.strip()] = int(number) if value.strip().lstrip("+-").isdigit() else number
    return out


SET_OPTION = click.option(
    "--set", "values", multiple=True, metavar="NAME=VALUE", callback=_values,
    help="A value for a free parameter, a search(...) of the recipe (`mgc check` lists their names); repeatable.",
)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mgc")
def main() -> None:
    """mgc, the merge-graph compiler: merge fine-tuned LLMs from a .merge recipe."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write the (only) output here instead; with several saves, under this folder. Relative to the "
                   "working directory (a recipe's own paths are relative to its folder).")
@click.option("--device", type=DEVICES, default="auto", show_default=True, help="Where merge math runs; auto = cuda when available.")
@click.option("--force", is_flag=True, help="Replace output folders that exist and are not empty.")
@click.option("--dry-run", is_flag=True, help="Check and plan, print the plan, write nothing.")
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints, which can run code: only for trusted files.")
@click.option("--max-memory", metavar="SIZE", help="Cap on tensor memory, e.g. 8GB; the run is refused if the plan needs more.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--distributed", is_flag=True,
              help="Split the work among the processes torchrun started (implied under torchrun; docs/distributed.md).")
@SET_OPTION
def run(recipe, output, device, force, dry_run, allow_pickle, max_memory, quiet, distributed, values):
    """Merge: run RECIPE and write its saves. A run that was interrupted continues where it stopped."""
    from mgc.api import compile_recipe
    from mgc.runtime.execute import execute
    from mgc.compiler.plan import format_bytes

    from mgc.compiler.check import parse_size
    from mgc.runtime import distributed as dist
    from mgc.runtime.signals import exit_on_signals

    gc.freeze()  # torch's and mgc's objects live as long as the process: no collection need walk them again
    cap = None
    if max_memory is not None:
        cap = parse_size(max_memory)
        if cap is None:
            raise click.BadParameter(f"not a size: {max_memory!r} (e.g. 8GB, 512MiB)", param_hint="--max-memory")
    # SIGTERM and SIGHUP clean up as Ctrl-C does; either exits with 128 + the signal's number (143, 130)
    with exit_on_signals():
        try:
            world = dist.world_from_env(distributed)
            quiet = quiet or world.rank != 0  # under torchrun, rank 0 speaks for the run
            plan = compile_recipe(recipe, allow_pickle=allow_pickle, output=output, values=values)
            if world.rank == 0:
                _warn(plan)
            if dry_run:
                if world.rank == 0:
                    click.echo(plan.summary())
                return
            from mgc.api import prepare, require_bound

            require_bound(plan)
            if world.rank == 0:  # first: Fisher and gate caches are computed once, then found by the other ranks
                prepare(plan, device=device, progress=not quiet, force=force)
            world.barrier()
            if world.rank != 0:
                prepare(plan, device=device, progress=False, force=force)
            stats = execute(plan, device=device, force=force, progress=not quiet, max_memory=cap, world=world)
        except MgcError as e:
            _fail(e)
        finally:
            dist.close()
    if not quiet:
        for s in plan.program.saves:
            click.echo(f"wrote {s.path}")
        for report in stats.adapters.values():  # extract_lora(): the energy its factors keep
            click.echo(report.summary())
        click.echo(
            f"{stats.tensors_written} tensors, {format_bytes(stats.bytes_read)} read, "
            f"{format_bytes(stats.bytes_written)} written in {stats.seconds:.2f} s"
            + (f" by {world.size} processes" if world.size > 1 else "")
        )


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints.")
@SET_OPTION
def check(recipe, allow_pickle, values):
    """Check RECIPE without reading tensor data."""
    compile_recipe = _compiler()

    try:
        plan = compile_recipe(recipe, allow_pickle=allow_pickle, values=values)
    except MgcError as e:
        _fail(e)
    _warn(plan)
    n = len(plan.program.saves)
    click.echo(f"{recipe}: ok ({n} output{'s' if n != 1 else ''}, {len(plan.program.checkpoints)} checkpoints)")
    for d in plan.program.free.values():
        click.echo(f"free parameter {d.name} = {d} at {d.span.line}:{d.span.col} (default {d.default:g})")
    for s in plan.program.saves:
        if s.adapter is not None:
            click.echo(f"{s.path}: {s.adapter.describe()}")
    if plan.program.unused:
        click.echo(f"warning: assigned but never saved: {', '.join(plan.program.unused)}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--explain", is_flag=True, help="List the rewrite rules that fired in each pass.")
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints.")
@SET_OPTION
def plan(recipe, explain, allow_pickle, values):
    """Print the optimized plan of RECIPE: passes, work, bytes, peak memory."""
    compile_recipe = _compiler()

    try:
        p = compile_recipe(recipe, allow_pickle=allow_pickle, values=values)
        lines = []
        if p.program.free and not values:
            from mgc.search_setup import sharing_lines

            lines = sharing_lines(recipe, allow_pickle)
    except MgcError as e:
        _fail(e)
    _warn(p)
    click.echo("\n".join([p.summary(explain=explain)] + lines))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--unoptimized", is_flag=True, help="The graph as lowered, before the passes.")
@SET_OPTION
def graph(recipe, unoptimized, values):
    """Print the tensor graph of RECIPE as DOT (render with `dot -Tsvg`)."""
    compile_recipe = _compiler()

    try:
        p = compile_recipe(recipe, optimize_graph=not unoptimized, values=values)
    except MgcError as e:
        _fail(e)
    click.echo(p.to_dot())


@main.command()
@click.argument("name", required=False)
@click.option("--markdown", is_flag=True, help="The operator table in Markdown, as in the README.")
def ops(name, markdown):
    """List the merge operators, or show one operator's parameters."""
    from mgc.core.errors import RecipeNameError, did_you_mean
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


@main.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--absolute", is_flag=True, help="Make the recipe's relative paths absolute, so that it runs from any folder.")
def recipe(output, absolute):
    """Print the recipe that made OUTPUT (a folder written by `mgc run`), exactly as it was.

    Its relative paths are relative to the folder the recipe was in (said on stderr): save it there to run it
    again, e.g. `mgc recipe OUT > FOLDER/again.merge && mgc run FOLDER/again.merge -o OUT2`, or use --absolute."""
    from mgc.runtime.provenance import (
        KEY_RECIPE, KEY_RECIPE_FOLDER, KEY_RECIPE_NAME, KEY_VERSION, absolute_paths, read_provenance,
    )

    try:
        meta = read_provenance(output)
        text, folder = meta[KEY_RECIPE], meta.get(KEY_RECIPE_FOLDER, "?")
        if absolute:
            text = absolute_paths(text, meta.get(KEY_RECIPE_NAME, "<recipe>"), folder)
    except MgcError as e:
        _fail(e)
    where = "its paths are absolute" if absolute else f"its relative paths are relative to {folder}"
    click.echo(f"# {meta.get(KEY_RECIPE_NAME, '?')}, run by mgc {meta.get(KEY_VERSION, '?')}; {where}", err=True)
    click.echo(text, nl=False)


@main.command(name="import")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the recipe here (its paths are relative to its folder); default: print it.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
def import_(config, output, force):
    """Translate a mergekit (or mergekit-multi) CONFIG.yml into a .merge recipe (docs/migration.md).

    Relative model paths are read from the working directory, as mergekit reads them."""
    from mgc.mergekit_import import import_config

    try:
        if output is not None and output.exists() and not force:
            raise MgcError(f"{output} exists: pass --force to replace it")
        text = import_config(config, output=output)
    except MgcError as e:
        _fail(e)
    if output is None:
        click.echo(text, nl=False)
        return
    from mgc.core.errors import OutputError
    from mgc.grammar.format_files import write_atomically

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(output, text)
    except OSError as e:
        _fail(OutputError(f"cannot write {output}: {e.strerror or e}"))
    click.echo(f"wrote {output}", err=True)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--check", is_flag=True, help="Write nothing; exit 1 listing the files that would change.")
def fmt(files, check):
    """Format recipes in the canonical layout, in place (folders: every *.merge below; `-`: stdin to stdout)."""
    from mgc.grammar.format import fmt_files

    sys.exit(fmt_files(files, check, click.echo, lambda line: click.echo(line, err=True),
                       stdin=sys.stdin))


from mgc import cli_models  # noqa: E402,F401  (registers search, eval and diagnose on `main`)

if __name__ == "__main__":  # pragma: no cover
    # `python -m mgc.cli`: this module runs as __main__, and cli_models registered its commands on mgc.cli's `main`
    from mgc.cli import main as registered

    registered()
