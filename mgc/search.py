"""`mgc search`: choose a recipe's free parameters (its `search(...)` domains) by evaluating candidate merges.

Each trial binds the domains to values an optuna sampler proposes, plans that recipe, runs the plan into memory
(runtime/memory.py: no checkpoint is written), loads the tensors into one transformers model and scores it as
`mgc eval` does (mgc/search_eval.py). The part of the graph that no free parameter changes is computed in the
first trial and kept (compiler/search_plan.py), within `max_memory`. A trial whose first parts of the data already
score worse than the best trial's same parts is stopped (`prune`). At the end the best values are scored on the
held-out data beside the recipe's defaults and each input model (mgc/search_report.py writes the files).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from mgc.compiler.outputs import program_inputs
from mgc.core.errors import MgcError, RecipeTypeError
from mgc.lm import require
from mgc.runtime.memory import TensorCache, run_in_memory
from mgc.search_eval import METRICS, MemoryModel, Scorer, limit_for, split_data
from mgc.search_setup import Setup, invariant_part, prepare_search

SAMPLERS = ("tpe", "cmaes", "random")


@dataclass
class Trial:
    number: int
    state: str
    values: dict  # domain name -> value
    score: Optional[float]
    build_s: float = 0.0
    eval_s: float = 0.0
    computed: dict = field(default_factory=dict)  # nodes computed, by kind (runtime/memory.py)
    reused: int = 0
    note: str = ""


def tokenizer_of(setup: Setup):
    save = setup.program.saves[0]
    vocab = save.vocab
    source = vocab.tokenizer if vocab is not None else save.tokenizer
    if source is None or not source.checkpoint.tokenizer_files():
        raise RecipeTypeError("mgc search needs the output's tokenizer, and its source checkpoint has none", save.span)
    if vocab is not None and (vocab.added or vocab.names):
        raise RecipeTypeError(
            "mgc search does not yet score an output whose vocabulary the save changes (tokens added or aligned)",
            save.span, "search a recipe whose inputs share one tokenizer, then add the vocabulary options",
        )
    transformers = require("transformers", "mgc search")
    return transformers.AutoTokenizer.from_pretrained(str(source.checkpoint.path)), Path(source.checkpoint.path)


def make_study(optuna, metric: str, sampler: str, storage: Optional[str], name: str, seed: int, prune: bool,
               fingerprint: str = ""):
    """The optuna study. One kept in `storage` and resumed must be of the same search (`fingerprint`: the recipe,
    its domains, the data and the metric), or its trials would stand for values of another recipe."""
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    if sampler == "cmaes":
        require("cmaes", "--sampler cmaes", "search")
    from mgc.search_prune import BestSoFarPruner

    try:
        study = optuna.create_study(
            study_name=name, storage=storage, load_if_exists=storage is not None, direction=METRICS[metric],
            sampler=samplers[sampler](), pruner=BestSoFarPruner() if prune else optuna.pruners.NopPruner(),
        )
    except Exception as e:  # a URL SQLAlchemy cannot parse, a database it cannot open, another direction
        raise RecipeTypeError(f"--study {storage}: {str(e).splitlines()[0]}", None,
                              "give a database URL optuna can open, e.g. sqlite:///study.db") from None
    known = study.user_attrs.get("mgc.fingerprint")
    if known is None:
        study.set_user_attr("mgc.fingerprint", fingerprint)
    elif known != fingerprint:
        raise RecipeTypeError(
            f"--study {storage}: the study '{name}' there was made by another search (another recipe, domains, data "
            "or metric); its trials do not stand for this one's values", None,
            "give this search a database of its own, or delete the old study",
        )
    return study


def fingerprint(setup: Setup, data, metric: str, holdout: float, seed: int) -> str:
    """What a study's trials depend on: the recipe's text, the data file's contents, the metric and the split."""
    import hashlib

    h = hashlib.sha256(setup.tree.source.text.encode())
    h.update(Path(data).read_bytes())
    h.update(f"{metric}|{holdout!r}|{seed}".encode())
    return h.hexdigest()


def default_budget() -> int:
    """Half the machine's memory: the default cap on what is kept across trials."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError, AttributeError):
        return 8 << 30


def suggest(trial, domain):
    if domain.choices:
        return trial.suggest_categorical(domain.name, list(domain.choices))
    return trial.suggest_float(domain.name, domain.low, domain.high, log=domain.log)


def run_search(
    recipe, data, *, metric: Optional[str] = None, teachers: Sequence = (), trials: int = 20,
    timeout: Optional[float] = None, sampler: str = "tpe", study: Optional[str] = None, holdout: float = 0.2,
    out: Optional[Path] = None, device: str = "auto", max_memory: Optional[int] = None, seed: int = 0,
    batch_size: int = 8, max_length: int = 512, prune: bool = True, allow_pickle: bool = False, force: bool = False,
    log=print,
):
    """Search, write the results into `out`, and return mgc.search_report.Report."""
    from mgc.api import prepare
    from mgc.lm import load
    from mgc.search_report import Report, baselines, check_folder, write_results

    optuna = require("optuna", "mgc search", "search")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # mgc reports failed trials itself, without a traceback
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    setup = prepare_search(recipe, allow_pickle, device)
    out = Path(out) if out is not None else Path(f"{Path(recipe).stem}-search")
    check_folder(out, force, list(program_inputs(setup.program)) + [Path(recipe), Path(data)] + [Path(t) for t in teachers])
    tokenizer, tokenizer_path = tokenizer_of(setup)
    config = setup.program.saves[0].config
    split = split_data(data, tokenizer, limit_for(config, max_length), holdout, seed)
    metric = metric or ("accuracy" if split.kind == "qa" else "perplexity")
    if metric == "accuracy" and split.kind != "qa":
        raise RecipeTypeError("--metric accuracy needs prompt/answer records (a .jsonl file)", None,
                              "use --metric perplexity for plain text")
    require("transformers", "mgc search").utils.logging.disable_progress_bar()
    teacher_models = [load(t, setup.device, allow_pickle=allow_pickle)[0] for t in teachers]
    scorer = Scorer(metric, tokenizer, batch_size, teacher_models)
    start = time.perf_counter()
    at_defaults, shared = invariant_part(setup)
    # as a run prepares: hub shards downloaded, fisher() and moe() gates computed into their caches, which are
    # registered with the checkpoints every trial's plan shares (one `Inputs` for all)
    prepare(at_defaults, device=str(setup.device))
    cache = TensorCache(shared.keep, max_memory if max_memory is not None else default_budget())
    model = MemoryModel(config, setup.device)
    log(f"searching {len(setup.domains)} free parameters ({', '.join(d.name for d in setup.domains.values())}) "
        f"on {len(split.search)} items, {len(split.holdout)} held out; {metric}, {sampler} sampler")
    done: list[Trial] = []

    def objective(trial) -> float:
        try:
            return attempt(trial)
        except MgcError as err:  # these values cannot be merged (a check across parameters, a NaN): a failed trial
            done[-1].note = err.message
            log(f"trial {trial.number} failed: {err.message}")
            raise

    def attempt(trial) -> float:
        values = {key: suggest(trial, d) for key, d in setup.domains.items()}
        named = {setup.domains[k].name: v for k, v in values.items()}
        record = Trial(trial.number, "RUNNING", named, None)
        done.append(record)
        t0 = time.perf_counter()
        run = run_in_memory(setup.plan(values), cache, str(setup.device))
        lm = model.load(run.tensors)
        del run.tensors
        record.build_s, record.computed, record.reused = time.perf_counter() - t0, dict(run.computed), run.reused
        t1 = time.perf_counter()

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                record.eval_s, record.state, record.note = time.perf_counter() - t1, "PRUNED", f"after part {step + 1}"
                raise optuna.TrialPruned()

        record.score = scorer.score(lm, split.search, report)
        record.eval_s, record.state = time.perf_counter() - t1, "COMPLETE"
        log(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" for k, v in named.items())
            + f" -> {metric} {record.score:.4g} (merge {record.build_s:.2f} s, eval {record.eval_s:.2f} s)")
        return record.score

    opt_study = make_study(optuna, metric, sampler, study, Path(recipe).stem, seed, prune,
                           fingerprint(setup, data, metric, holdout, seed))
    try:
        opt_study.optimize(objective, n_trials=trials, timeout=timeout, catch=(MgcError,))
    except KeyboardInterrupt:
        log("interrupted: reporting the trials done so far")
    for record in done:
        if record.state == "RUNNING":
            record.state = "FAIL"
    complete = [t for t in opt_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RecipeTypeError("no trial completed", None, "see the errors above; a wider --timeout or more --trials may help")
    best = opt_study.best_trial
    by_name = {d.name: k for k, d in setup.domains.items()}
    best_values = {by_name[name]: v for name, v in best.params.items() if name in by_name}
    rows = baselines(setup, best_values, split, scorer, model, cache, best.value, tokenizer, tokenizer_path)
    report = Report(recipe=Path(recipe), metric=metric, direction=METRICS[metric], trials=done, study=opt_study,
                    best_values=best_values, rows=rows, seconds=time.perf_counter() - start,
                    cached_bytes=cache.held, shared=shared)
    write_results(report, setup, out)
    return report
