"""`mgc search`'s results: the best values scored on held-out data beside the baselines, and the files written.

Files in the output folder:
* best.merge: the recipe with each search(...) replaced by its best value, formatted (its relative paths made
  absolute when the folder is not the recipe's, so it runs from there);
* trials.csv: one row per trial of the study (also earlier runs' trials of a resumed study);
* objective.png (the score of each trial and the best so far) and importances.png (optuna's fANOVA importance
  of each free parameter), drawn with matplotlib;
* report.md: the table below and the time per trial.
"""
from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mgc.compiler.search_space import bound_text
from mgc.core.errors import OutputError
from mgc.grammar import parse
from mgc.grammar.format import format_recipe, write_atomically
from mgc.runtime.memory import run_in_memory

FILES = ("best.merge", "trials.csv", "objective.png", "importances.png", "report.md")


@dataclass
class Row:
    label: str
    search: Optional[float]
    holdout: Optional[float]
    note: str = ""


@dataclass
class Report:
    recipe: Path
    metric: str
    direction: str
    trials: list
    study: object
    best_values: dict
    rows: list[Row]
    seconds: float
    cached_bytes: int
    shared: object
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def baselines(setup, best_values, split, scorer, model, cache, best_score, tokenizer, tokenizer_path) -> list[Row]:
    """The best values, the recipe's defaults and each input checkpoint, on the search and held-out items."""
    def merged(values) -> object:
        return model.load(run_in_memory(setup.plan(values), cache, str(setup.device)).tensors)

    def held(lm) -> Optional[float]:
        return scorer.score(lm, split.holdout) if split.holdout else None

    names = {k: d.name for k, d in setup.domains.items()}
    shown = ", ".join(f"{names[k]}={_num(v)}" for k, v in best_values.items())
    rows = [Row(f"best ({shown})", best_score, held(merged(best_values)))]
    lm = merged({})
    rows.append(Row("recipe defaults", scorer.score(lm, split.search), held(lm)))
    rows += _inputs(setup, split, scorer, tokenizer, tokenizer_path)
    return rows


def _inputs(setup, split, scorer, tokenizer, tokenizer_path) -> list[Row]:
    from transformers import AutoTokenizer

    from mgc.core.hub_checkpoint import RemoteCheckpoint
    from mgc.lm import load

    rows = []
    vocab = tokenizer.get_vocab()
    for leaf in setup.program.saves[0].model.leaves():
        ckpt = leaf.checkpoint
        label = f"input {getattr(ckpt, 'label', ckpt.path)}"
        if isinstance(ckpt, RemoteCheckpoint):
            rows.append(Row(label, None, None, "on the hub: not scored"))
            continue
        if Path(ckpt.path) != tokenizer_path and (
            not ckpt.tokenizer_files() or AutoTokenizer.from_pretrained(str(ckpt.path)).get_vocab() != vocab
        ):
            rows.append(Row(label, None, None, "another tokenizer: not comparable"))
            continue
        lm, _ = load(ckpt.path, setup.device, allow_pickle=setup.allow_pickle)
        rows.append(Row(label, scorer.score(lm, split.search), scorer.score(lm, split.holdout) if split.holdout else None))
        del lm
    return rows


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(report: Report) -> str:
    lines = [f"| | {report.metric} (search) | {report.metric} (held out) | |", "|---|---:|---:|---|"]
    for r in report.rows:
        lines.append(f"| {r.label} | {_cell(r.search)} | {_cell(r.holdout)} | {r.note} |")
    return "\n".join(lines)


def _cell(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def timing(report: Report) -> str:
    done = [t for t in report.trials if t.state in ("COMPLETE", "PRUNED")]
    if not done:
        return ""
    build = sum(t.build_s for t in done) / len(done)
    evaluate = sum(t.eval_s for t in done) / len(done)
    first = done[0]
    pruned = sum(t.state == "PRUNED" for t in done)
    failed = sum(t.state == "FAIL" for t in report.trials)
    return (
        f"{len(done)} trials ({pruned} stopped early{f', and {failed} failed' if failed else ''}) in "
        f"{report.seconds:.1f} s; per trial: merge in memory "
        f"{build:.2f} s (first trial {first.build_s:.2f} s, which computed the shared part), evaluate {evaluate:.2f} s. "
        f"{report.shared.tensors_fixed} of {report.shared.tensors} tensors do not depend on the free parameters; "
        f"{report.cached_bytes / 2**20:.1f} MiB kept across trials."
    )


def check_folder(out: Path, force: bool, inputs) -> None:
    """The results folder: new, empty, or (with force) one holding only earlier results; never an input's."""
    from mgc.compiler.outputs import overlaps

    for path in inputs:
        if overlaps(out, path):
            raise OutputError(f"results folder '{out}' overlaps the input '{path}'", None, "choose another --out folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"results folder '{out}' exists and is not a folder")
    if out.is_dir():
        others = [p.name for p in out.iterdir() if p.name not in FILES]
        if others or (any(out.iterdir()) and not force):
            raise OutputError(
                f"results folder '{out}' exists and is not empty", None,
                "pass --force to replace earlier results in it" if not others else "choose a new --out folder",
            )


def write_results(report: Report, setup, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = bound_text(setup.tree.source.text, setup.domains, report.best_values)
    if Path(out).resolve() != Path(setup.base_dir).resolve():
        from mgc.runtime.provenance import absolute_paths

        text = absolute_paths(text, setup.tree.source.name, str(setup.base_dir))
    best = format_recipe(parse(text, str(out / "best.merge")))
    write_atomically(out / "best.merge", best)
    write_atomically(out / "trials.csv", _csv(report))
    report.files = [out / "best.merge", out / "trials.csv"] + _plots(report, out)
    md = [f"# mgc search: {report.recipe.name}", "", format_table(report), "", timing(report), ""]
    write_atomically(out / "report.md", "\n".join(md))
    report.files.append(out / "report.md")


def _csv(report: Report) -> str:
    ours = {t.number: t for t in report.trials}
    names = sorted({name for t in report.study.trials for name in t.params})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", "state", report.metric] + names + ["merge_s", "eval_s", "nodes_computed", "nodes_reused", "note"])
    for t in report.study.trials:
        mine = ours.get(t.number)
        w.writerow([t.number, t.state.name, "" if t.value is None else repr(t.value)]
                   + [repr(t.params[n]) if n in t.params else "" for n in names]
                   + ([f"{mine.build_s:.3f}", f"{mine.eval_s:.3f}", sum(mine.computed.values()), mine.reused, mine.note]
                      if mine else ["", "", "", "", "an earlier run"]))
    return buf.getvalue()


def _plots(report: Report, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    drawn = []
    for name, draw in (("objective.png", ovm.plot_optimization_history), ("importances.png", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():  # optuna's notes on few trials: the report says what was not drawn
                warnings.simplefilter("ignore")
                ax = draw(report.study)
        except Exception as e:  # too few trials for importances, one value only: say so, draw nothing
            (out / name).unlink(missing_ok=True)
            report.notes.append(f"{name} not drawn: {e}")
            continue
        ax.figure.tight_layout()
        ax.figure.savefig(out / name, dpi=110)
        plt.close(ax.figure)
        drawn.append(out / name)
    return drawn
