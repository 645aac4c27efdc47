"""The commands that load models with transformers: `mgc search`, `mgc eval` and `mgc diagnose` (registered on
mgc.cli's `main`, which imports this module)."""
from __future__ import annotations

from pathlib import Path

import click

from mgc.cli import DEVICES, _fail, main
from mgc.core.errors import MgcError


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
