"""Repeated trials (hydra.sweeper.repeats): a trial's setting runs once per seed of one list that
every trial shares, so that trials are paired by seed, and its objective is the mean over them.

What a trial keeps, in user attrs, as its repeats finish: `repeat_seeds` (the shared list),
`repeat_values` (each seed's values in seed order, null where it has not finished) and
`repeat_run_dirs`. A trial lost with its worker is asked again with the same setting
(`retry_of`), and runs only the repeats the lost one had not finished: a mean is never taken
over a missing repeat. The statistics of repeated results (the mean and its standard error, the
paired interval between two trials) are here too; the interval is report.paired_interval.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import optuna

from spectraqlora.analysis.report import paired_interval
from spectraqlora.errors import UserError

State = optuna.trial.TrialState
SEEDS, VALUES, RUN_DIRS = "repeat_seeds", "repeat_values", "repeat_run_dirs"
RETRY_OF = "retry_of"  # user attr of a trial asked again for a lost one: that trial's number
CONFIRM = "confirm_overrides"  # user attr of a confirmation trial: the setting it runs
REPORT_TO = "hydra.sweeper.report_to"  # per-job override: the trial a job reports eval losses to
WILCOXON = "optuna.pruners.WilcoxonPruner"


@dataclass
class Repeats:
    seeds: list[int]
    key: str  # the override each repeat's seed is passed as
    across: bool  # the study's pruner judges the repeats (Wilcoxon), not the runs' eval steps


def configured(repeats: int, seeds, key: str, pruner_cfg, n_directions: int) -> Repeats | None:
    """The repeats a sweep asks for, checked; None for one run per trial under the config's own
    seed (hydra.sweeper.repeats=1 and no repeat_seeds: the peer's behaviour)."""
    across = pruner_cfg.get("_target_") == WILCOXON
    if repeats < 1:
        raise UserError(f"hydra.sweeper.repeats={repeats}: expected a positive number of runs per trial")
    if seeds is None:
        if repeats == 1:
            if across:
                raise UserError(f"hydra/sweeper/pruner=wilcoxon prunes across a trial's repeats: set "
                                f"hydra.sweeper.repeats={fewest_repeats(pruner_cfg)} or more")
            if key != "seed":
                raise UserError(f"hydra.sweeper.repeat_key={key} with one run per trial: no repeat seed is "
                                f"passed; set hydra.sweeper.repeats (or drop repeat_key)")
            return None
        seeds = list(range(1, repeats + 1))
    seeds = list(seeds)
    if len(seeds) != repeats:
        raise UserError(f"hydra.sweeper.repeat_seeds has {len(seeds)} seeds but hydra.sweeper.repeats="
                        f"{repeats}: give hydra.sweeper.repeats={len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"hydra.sweeper.repeat_seeds={seeds} repeats a seed: give distinct seeds")
    if across:
        _check_wilcoxon(pruner_cfg, repeats, n_directions)
    return Repeats(seeds, key, across)


def _check_wilcoxon(pruner_cfg, repeats: int, n_directions: int) -> None:
    """A Wilcoxon pruner that can never prune is refused: with n paired values its smallest
    one-sided p-value is 0.5**n, and it tests only between the repeats (after the last one
    there is nothing left to save)."""
    if n_directions > 1:
        raise UserError("hydra/sweeper/pruner=wilcoxon: multi-objective studies cannot prune; "
                        "use hydra/sweeper/pruner=none")
    p, startup = pruner_cfg.p_threshold, pruner_cfg.n_startup_steps
    if repeats < fewest_repeats(pruner_cfg):
        raise UserError(f"hydra/sweeper/pruner=wilcoxon with hydra.sweeper.repeats={repeats}, "
                        f"p_threshold={p} and n_startup_steps={startup} can never prune: with n "
                        f"paired repeats the smallest p-value is 0.5^n, tested before the last "
                        f"repeat; raise hydra.sweeper.repeats to {fewest_repeats(pruner_cfg)} or "
                        f"hydra.sweeper.pruner.p_threshold above {0.5 ** (repeats - 1):g}")


def fewest_repeats(pruner_cfg) -> int:
    """The fewest repeats with which a Wilcoxon pruner can prune: n paired values before the
    last repeat, n at least max(2, n_startup_steps) and 0.5**n below p_threshold."""
    p, startup = pruner_cfg.p_threshold, pruner_cfg.n_startup_steps
    if p <= 0:
        raise UserError(f"hydra.sweeper.pruner.p_threshold={p}: a Wilcoxon pruner never prunes at 0")
    return next(n for n in range(max(2, startup), 10_000) if 0.5 ** n < p) + 1


def check_key(repeats: Repeats | None, fixed: list[str], space: dict) -> None:
    """The repeat key is the sweeper's to set: refused among the search params and overrides."""
    if repeats is None:
        return
    given = [o for o in fixed if o.split("=", 1)[0].lstrip("+~") == repeats.key] + \
        [k for k in space if k == repeats.key]
    if given:
        raise UserError(f"{given[0]}: {repeats.key} is set by hydra.sweeper.repeats (seeds "
                        f"{repeats.seeds}); drop it, or choose the seeds with "
                        f"hydra.sweeper.repeat_seeds=[...]")


def job_overrides(base: list[str], repeats: Repeats, index: int, subdir: str, report_to: int | None) -> list[str]:
    seed = repeats.seeds[index]
    return [*base, f"{repeats.key}={seed}", f"hydra.sweep.subdir={subdir}/{repeats.key.replace('/', '_')}_{seed}",
            f"{REPORT_TO}={'null' if report_to is None else report_to}"]


def carried(study: optuna.Study, trial: optuna.Trial, repeats: Repeats) -> dict[int, tuple[list, str]]:
    """{seed index: (values, run dir)} a retry takes over from the lost trial it replaces."""
    number = trial.user_attrs.get(RETRY_OF)
    if number is None:
        return {}
    lost = study.get_trials(deepcopy=False)[number]
    if lost.user_attrs.get(SEEDS) != repeats.seeds:  # resumed with other seeds: start afresh
        return {}
    values, dirs = lost.user_attrs.get(VALUES) or [], lost.user_attrs.get(RUN_DIRS) or []
    return {i: (v, dirs[i]) for i, v in enumerate(values) if v is not None}


def record(trial: optuna.Trial, repeats: Repeats, done: dict[int, tuple[list, str]]) -> None:
    """The finished repeats into the trial's user attrs (after each one: a lost trial keeps them)."""
    last = max(done, default=-1) + 1
    trial.set_user_attr(SEEDS, repeats.seeds)
    trial.set_user_attr(VALUES, [done[i][0] if i in done else None for i in range(last)])
    trial.set_user_attr(RUN_DIRS, [done[i][1] if i in done else None for i in range(last)])


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Ask a lost repeated trial again: same setting, the finished repeats kept."""
    attrs = {RETRY_OF: trial.number}
    if CONFIRM in trial.user_attrs:
        attrs[CONFIRM] = trial.user_attrs[CONFIRM]
    study.enqueue_trial(trial.params, user_attrs=attrs)


def mean(values: list[list[float]]) -> list[float]:
    """Per objective, the mean over repeats (values: one list of objectives per repeat)."""
    return [statistics.mean(column) for column in zip(*values)]


def per_seed(trial: optuna.trial.FrozenTrial) -> list[float]:
    """A finished single-objective trial's value per seed, in seed order."""
    return [v[0] for v in trial.user_attrs[VALUES]]


def sem(values: list[float]) -> float | None:
    """Standard error of the mean; None for a single value."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def difference(a: list[float], b: list[float]) -> dict:
    """a - b paired by seed: mean, 95% Student-t interval and n (interval null for n = 1)."""
    mean_, half = paired_interval([x - y for x, y in zip(a, b)])
    ci = None if math.isnan(half) else [mean_ - half, mean_ + half]
    return {"mean": mean_, "ci95": ci, "n": len(a)}


def ranked(study: optuna.Study, trials=None) -> list[optuna.trial.FrozenTrial]:
    """Complete trials, best first (single objective)."""
    trials = study.get_trials(deepcopy=False, states=(State.COMPLETE,)) if trials is None else trials
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(trials, key=lambda t: (sign * t.value, t.number))


def uncertainty(study: optuna.Study) -> dict:
    """optimization_results.yaml's fields for a repeated single-objective study: the best's sem,
    the runner-up, their paired difference and whether its interval excludes 0."""
    top = [t for t in ranked(study) if VALUES in t.user_attrs]
    if not top:
        return {}
    out = {"best_value_sem": sem(per_seed(top[0]))}
    if len(top) > 1:
        best, second = top[0], top[1]
        out["runner_up"] = {"trial": second.number, "params": second.params, "value": second.value,
                            "value_sem": sem(per_seed(second))}
        diff = difference(per_seed(best), per_seed(second))
        out["best_vs_runner_up"] = diff
        out["distinguishable"] = diff["ci95"] is not None and not diff["ci95"][0] <= 0 <= diff["ci95"][1]
    return out


def undistinguished(repeats: int) -> str:
    return (f"the best and the runner-up differ by less than their noise with {repeats} repeats: "
            f"raise hydra.sweeper.repeats or the eval set")
