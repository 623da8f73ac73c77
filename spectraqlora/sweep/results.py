"""What a sweep leaves in its sweep dir, rewritten (atomically) after every trial:
optimization_results.yaml (hydra-optuna-sweeper's fields first), trials.csv, and the plots."""
from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from spectraqlora.store import rundir
from spectraqlora.sweep import repeats as rep

log = logging.getLogger(__name__)
State = optuna.trial.TrialState
RESULTS = "optimization_results.yaml"


def objective_names(objectives: list[str] | None, directions: list[str]) -> list[str]:
    if objectives:
        return objectives
    return ["objective"] if len(directions) == 1 else [f"objective_{i}" for i in range(len(directions))]


def shown_url(url: str) -> str:
    """The storage URL without its password (results files and logs never hold secrets)."""
    if url.startswith("journal://"):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def write_results(study: optuna.Study, sweep_dir: Path, names: list[str], directions: list[str],
                  url: str, repeats: rep.Repeats | None = None):
    """optimization_results.yaml and trials.csv; returns the trials table (a DataFrame) and the
    results. With repeats, a trial's value is its mean over them, and the best comes with its
    standard error, the runner-up and their difference paired by seed."""
    trials = study.get_trials(deepcopy=False)
    results = {
        "name": "optuna",  # hydra-optuna-sweeper's fields first: name, best_params, best_value
        "sweeper": "spectraqlora_optuna",
        "study_name": study.study_name,
        "storage": shown_url(url),
        "directions": directions,
        "objectives": names,
        "trials": dict(Counter(t.state.name for t in trials)),
    }
    complete = [t for t in trials if t.state is State.COMPLETE]
    if complete and len(directions) == 1:
        best = study.best_trial
        results.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_run_dir=best.user_attrs.get("run_dir"))
        if repeats:
            results["repeats"] = {"key": repeats.key, "seeds": repeats.seeds}
            results.update(rep.uncertainty(study))
            if results.get("distinguishable") is False:
                results["note"] = rep.undistinguished(len(repeats.seeds))
    elif complete:
        front = sorted(study.best_trials, key=lambda t: t.number)
        results["solutions"] = [{"params": t.params, "values": list(t.values)} for t in front]
        results["pareto_front"] = [{"trial": t.number, "values": dict(zip(names, t.values)),
                                    "params": t.params, "run_dir": t.user_attrs.get("run_dir")} for t in front]
    rundir.write_text(sweep_dir / RESULTS, OmegaConf.to_yaml(OmegaConf.create(results)))
    table = study.trials_dataframe()
    rundir.write_text(sweep_dir / "trials.csv", table.to_csv(index=False))
    return table, results


# Fewer finished trials than this: parameter importances are noise, and the plot says so.
RELIABLE_IMPORTANCES = 10


def plot_study(study: optuna.Study, names: list[str], complete: int, out: Path,
               repeats: rep.Repeats | None = None) -> list[Path]:
    """optuna.visualization.matplotlib figures as PNGs in `out`, drawn in a style context of
    their own (optuna sets ggplot globally, which leaked into later trials' heatmaps). With
    repeats (one objective): each trial's mean with its sem as an error bar, and repeats.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from optuna.visualization import matplotlib as vis

    first = {"target_name": names[0]} | ({} if len(names) == 1 else {"target": lambda t: t.values[0]})
    wanted = {"optimization_history.png": lambda: vis.plot_optimization_history(study, **first)}
    if complete >= 2:
        wanted["param_importances.png"] = lambda: vis.plot_param_importances(study, **first)
    if len(names) > 1:
        wanted["pareto_front.png"] = lambda: vis.plot_pareto_front(study, target_names=names)
    repeated = repeats is not None and len(names) == 1 and complete >= 1
    if repeated:
        wanted["repeats.png"] = lambda: plot_repeats(study, repeats, names[0])
    written = []
    for name, plot in wanted.items():
        try:
            with plt.style.context("default"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot()
                ax = axes if hasattr(axes, "figure") else axes.flat[0]
                if name == "optimization_history.png":
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
                    if repeated:
                        error_bars(ax, study)
                if name == "param_importances.png" and complete < RELIABLE_IMPORTANCES:
                    ax.text(0.98, 0.02, f"unreliable: only {complete} finished trials", ha="right",
                            va="bottom", transform=ax.transAxes, color="firebrick", fontsize=9)
                tmp = out / f".{name}.tmp.png"
                ax.figure.savefig(tmp, dpi=110, bbox_inches="tight")
                plt.close(ax.figure)
            os.replace(tmp, out / name)
            written.append(out / name)
        except Exception as exc:  # a plot must never stop a sweep
            log.debug("plot %s skipped: %s", name, exc)
    return written


def error_bars(ax, study: optuna.Study) -> None:
    """Each complete repeated trial's sem over its repeats, around its mean."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(State.COMPLETE,))
              if rep.sem(rep.per_seed(t)) is not None]
    ax.errorbar([t.number for t in trials], [t.value for t in trials], capsize=3, fmt="none",
                yerr=[rep.sem(rep.per_seed(t)) for t in trials], ecolor="gray", label="sem over repeats")
    ax.legend()


def plot_repeats(study: optuna.Study, repeats: rep.Repeats, name: str, top: int = 5):
    """The repeats of the best trials side by side by seed: paired differences show as lines
    that do not cross."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    positions = range(len(repeats.seeds))
    for trial in rep.ranked(study)[:top]:
        ax.plot(positions, rep.per_seed(trial), marker="o",
                label=f"trial {trial.number}: {trial.value:.4g} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float)
                                                                             else f"{k}={v}" for k, v in trial.params.items()))
    ax.set_xticks(list(positions), [f"{repeats.key}={s}" for s in repeats.seeds])
    ax.set_ylabel(name)
    ax.set_title(f"repeats of the {min(top, len(rep.ranked(study)))} best trials")
    ax.legend(fontsize=7)
    return ax
