"""Stop a trial whose first parts of the search data already score worse than the best trial's same parts.

Every trial is scored on the same items in the same order (mgc/search_eval.py), so the running score after part k
of two trials compares like with like. A trial is stopped at part k when its running score is worse than that of
the best complete trial at part k by more than `margin` (relative), from part `warmup` on.
"""
from __future__ import annotations

import optuna


class BestSoFarPruner(optuna.pruners.BasePruner):
    def __init__(self, margin: float = 0.0, warmup: int = 0):
        self.margin = margin
        self.warmup = warmup

    def prune(self, study: "optuna.study.Study", trial: "optuna.trial.FrozenTrial") -> bool:
        step = trial.last_step
        if step is None or step < self.warmup:
            return False
        try:
            best = study.best_trial
        except ValueError:  # no complete trial yet
            return False
        theirs = best.intermediate_values.get(step)
        if theirs is None:
            return False
        ours = trial.intermediate_values[step]
        if study.direction == optuna.study.StudyDirection.MINIMIZE:
            return ours > theirs + self.margin * abs(theirs)
        return ours < theirs - self.margin * abs(theirs)
