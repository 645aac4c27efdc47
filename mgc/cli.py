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
@SET_OPTION
def run(recipe, output, device, force, dry_run, allow_pickle, max_memory, quiet, values):
    """Merge: run RECIPE and write its saves."""
    from mgc.api import compile_recipe
    from mgc.runtime.execute import execute
    from mgc.compiler.plan import format_bytes

    from mgc.compiler.check import parse_size
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
            plan = compile_recipe(recipe, allow_pickle=allow_pickle, output=output, values=values)
            _warn(plan)
            if dry_run:
                click.echo(plan.summary())
                return
            from mgc.api import prepare, require_bound

            require_bound(plan)

            prepare(plan, device=device, progress=not quiet, force=force)
            stats = execute(plan, device=device, force=force, progress=not quiet, max_memory=cap)
        except MgcError as e:
            _fail(e)
    if not quiet:
        for s in plan.program.saves:
            click.echo(f"wrote {s.path}")
        for report in stats.adapters.values():  # extract_lora(): the energy its factors keep
            click.echo(report.summary())
        click.echo(
            f"{stats.tensors_written} tensors, {format_bytes(stats.bytes_read)} read, "
            f"{format_bytes(stats.bytes_written)} written in {stats.seconds:.2f} s"
        )


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints.")
@SET_OPTION
def check(recipe, allow_pickle, values):
    """Check RECIPE without reading tensor data."""
    from mgc.api import compile_recipe

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
    from mgc.api import compile_recipe

    try:
        p = compile_recipe(recipe, allow_pickle=allow_pickle, values=values)
        lines = []
        if p.program.free and not values:
            from mgc.search import sharing_lines

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
    from mgc.api import compile_recipe

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


def _quiet_transformers() -> None:
    """No weight-loading progress bars from transformers on the terminal (if it is installed)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class _GreedyOption(click.Option):
    """A `multiple` option that also takes the arguments after it up to the next option, so that
    `--teachers a b` works as well as `--teachers a --teachers b`. (Uses click's parser internals; where
    they are missing it is an ordinary repeatable option.)"""

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        opts = {**getattr(parser, "_long_opt", {}), **getattr(parser, "_short_opt", {})}
        for name in self.opts:
            parser_opt = opts.get(name)
            if parser_opt is None or not hasattr(parser_opt, "process"):
                continue
            process = parser_opt.process

            def greedy(value, state, process=process):
                process(value, state)
                while state.rargs and not state.rargs[0].startswith("-"):
                    process(state.rargs.pop(0), state)

            parser_opt.process = greedy


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "-d", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Text (documents separated by blank lines) or prompt/answer records (.jsonl) to score candidates on.")
@click.option("--metric", type=click.Choice(["perplexity", "accuracy", "kl"]), default=None,
              help="What to optimize: perplexity (text), answer accuracy (.jsonl) or KL to --teachers. Default: by the data.")
@click.option("--teachers", "-t", cls=_GreedyOption, multiple=True, type=click.Path(path_type=Path), metavar="T [T ...]",
              help="Checkpoints whose next-token distributions --metric kl follows (their mean KL).")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True, help="Trials to run (more with a resumed --study).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop starting trials after this many seconds.")
@click.option("--sampler", type=click.Choice(["tpe", "cmaes", "random"]), default="tpe", show_default=True, help="optuna's sampler.")
@click.option("--study", default=None, metavar="URL", help="Keep the study in a database and resume it, e.g. sqlite:///study.db.")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of the data kept out of the search, to score the best values on.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for best.merge, trials.csv, the plots and report.md (default: RECIPE-search).")
@click.option("--force", is_flag=True, help="Replace earlier results in --out.")
@click.option("--device", type=DEVICES, default="auto", show_default=True)
@click.option("--max-memory", metavar="SIZE", help="Cap on the tensors kept across trials, e.g. 8GB (default: half the RAM).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampler and the split of the data.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--no-prune", is_flag=True, help="Score every trial on all the search data.")
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints, which can run code.")
@click.option("-q", "--quiet", is_flag=True, help="Only the final report.")
def search(recipe, data, metric, teachers, trials, timeout, sampler, study, holdout, out, force, device, max_memory,
           seed, batch_size, max_length, no_prune, allow_pickle, quiet):
    """Choose RECIPE's free parameters (its search(...) values) by scoring candidate merges on --data.

    Each candidate is merged in memory (nothing is written), and what no free parameter changes is computed once.
    Writes best.merge (the recipe with the best values), trials.csv, objective.png, importances.png and report.md."""
    from mgc.compiler.check import parse_size
    from mgc.search import run_search
    from mgc.search_report import format_table, timing

    cap = None
    if max_memory is not None:
        cap = parse_size(max_memory)
        if cap is None:
            raise click.BadParameter(f"not a size: {max_memory!r} (e.g. 8GB, 512MiB)", param_hint="--max-memory")
    try:
        report = run_search(
            recipe, data, metric=metric, teachers=teachers, trials=trials, timeout=timeout, sampler=sampler,
            study=study, holdout=holdout, out=out, device=device, max_memory=cap, seed=seed, batch_size=batch_size,
            max_length=max_length, prune=not no_prune, allow_pickle=allow_pickle, force=force,
            log=(lambda line: None) if quiet else click.echo,
        )
    except MgcError as e:
        _fail(e)
    click.echo(format_table(report))
    click.echo(timing(report))
    for note in report.notes:
        click.echo(f"note: {note}")
    for f in report.files:
        click.echo(f"wrote {f}")


@main.command(name="eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A .txt file (documents separated by blank lines: perplexity) or a .jsonl file of "
                   '{"prompt", "answer"} records (teacher-forced answer accuracy).')
@click.option("--teachers", "-t", cls=_GreedyOption, multiple=True, type=click.Path(path_type=Path), metavar="T [T ...]",
              help="Teacher checkpoints (after the models): also report KL(teacher || model) for each and their mean.")
@click.option("--device", type=DEVICES, default="auto", show_default=True, help="Where the models run.")
@click.option("--max-length", type=click.IntRange(min=2), default=512, show_default=True,
              help="Most tokens per sequence (BOS included); also capped at the model's context length.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints, which can run code.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
def eval_(models, data, teachers, device, max_length, batch_size, allow_pickle, as_json):
    """Evaluate MODEL checkpoints on --data: perplexity, or answer accuracy; KL to --teachers.

    The KL is the mean over predicted positions of KL(p_teacher || p_model) between next-token
    distributions, in nats (the function distance of the Fisher-Rao merging paper).
    """
    import json

    from mgc.evaluate import evaluate, format_table

    _quiet_transformers()
    try:
        results = evaluate(list(map(str, models)), data, teachers=[str(t) for t in teachers], device=device,
                           max_length=max_length, batch_size=batch_size, allow_pickle=allow_pickle)
    except MgcError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    r = results[0]
    size = f"{r['records']} records, {r['answer_tokens']} answer tokens" if r["kind"] == "qa" else \
        f"{r['documents']} documents, {r['tokens']} predicted tokens"
    click.echo(f"data: {data} ({size}; max length {r['max_length']})")
    click.echo(format_table(results))
    truncated = max(x["truncated"] for x in results)
    if truncated:
        were = "sequence was" if truncated == 1 else "sequences were"
        click.echo(f"note: {truncated} {were} longer than {r['max_length']} tokens and cut")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A .txt file (documents separated by blank lines) or a .jsonl file (prompt + answer per record).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out/diagnose"),
              show_default=True, help="Folder for diagnostics.json and diagnostics.png.")
@click.option("--device", type=DEVICES, default="auto", show_default=True, help="Where the models run.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Tokens (BOS not counted) taken from the start of --data; use more than the hidden size.")
@click.option("--max-length", type=click.IntRange(min=2), default=512, show_default=True,
              help="Most tokens per document (BOS included).")
@click.option("--rtol", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Numerical rank counts the singular values above rtol * the largest.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Token resamples for a ± std on every statistic (0: none).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Also read pickle (.bin) checkpoints, which can run code.")
def diagnose(models, data, out_dir, device, max_tokens, max_length, rtol, bootstrap, batch_size, allow_pickle):
    """Collapse diagnostics of MODEL checkpoints: per-layer activation variance, effective rank, numerical rank.

    Prints a per-layer table and writes DIR/diagnostics.json and DIR/diagnostics.png.
    """
    import json

    from mgc.diagnose import diagnose as run_diagnose, format_table, plot

    _quiet_transformers()
    try:
        results = run_diagnose(list(map(str, models)), data, device=device, max_tokens=max_tokens, max_length=max_length,
                               batch_size=batch_size, rtol=rtol, bootstrap=bootstrap, allow_pickle=allow_pickle)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "diagnostics.json").write_text(json.dumps(results, indent=2) + "\n")
        plot(results, out_dir / "diagnostics.png")
    except MgcError as e:
        _fail(e)
    except OSError as e:
        from mgc.core.errors import OutputError

        _fail(OutputError(f"{out_dir}: cannot write the diagnostics: {e}"))
    click.echo(format_table(results))
    click.echo(f"\nwrote {out_dir / 'diagnostics.json'} and {out_dir / 'diagnostics.png'}")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--check", is_flag=True, help="Write nothing; exit 1 listing the files that would change.")
def fmt(files, check):
    """Format recipes in the canonical layout, in place (folders: every *.merge below; `-`: stdin to stdout)."""
    from mgc.grammar.format import fmt_files

    sys.exit(fmt_files(files, check, click.echo, lambda line: click.echo(line, err=True),
                       stdin=sys.stdin))


if __name__ == "__main__":  # pragma: no cover
    main()
