"""The sweeper's config schema, registered with Hydra (compatible with hydra-optuna-sweeper's
keys where they mean the same: sampler, direction, storage, study_name, n_trials, n_jobs, params,
custom_search_space)."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from spectraqlora.config import knob, optional_positive, positive
from spectraqlora.sweep.study import SWEEPER


@dataclass
class SamplerConfig:
    """Every sampler config takes the keys of its optuna class (and of hydra-optuna-sweeper's
    config of the same name); null means optuna's own default."""

    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class TPESamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.TPESampler"
    consider_prior: Optional[bool] = None
    prior_weight: Optional[float] = None
    consider_magic_clip: Optional[bool] = None
    consider_endpoints: Optional[bool] = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: Optional[bool] = None  # null: optuna 5's default (true)
    group: bool = False
    warn_independent_sampling: Optional[bool] = None
    constant_liar: bool = True  # optuna 5's default (hydra-optuna-sweeper: false)


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    """Needs the cmaes package: pip install "spectraqlora[cmaes]"."""

    _target_: str = "optuna.samplers.CmaEsSampler"
    x0: Optional[Dict[str, Any]] = None
    sigma0: Optional[float] = None
    n_startup_trials: int = 1
    independent_sampler: Optional[Any] = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: Optional[str] = None
    popsize: Optional[int] = None
    inc_popsize: int = -1
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.NSGAIISampler"
    population_size: int = 50
    mutation_prob: Optional[float] = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class QMCSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.QMCSampler"
    qmc_type: str = "sobol"
    scramble: bool = False
    independent_sampler: Optional[Any] = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class GPSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.GPSampler"
    n_startup_trials: int = 10
    deterministic_objective: bool = False
    independent_sampler: Optional[Any] = None
    warn_independent_sampling: bool = True


@dataclass
class GridSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.GridSampler"
    search_space: Optional[Dict[str, Any]] = None  # null: built from `params` (choice and range)


@dataclass
class RemovedSamplerConfig:
    """A sampler optuna no longer has: choosing it is one clear error."""

    _target_: str = "spectraqlora.sweep.space.removed_sampler"
    name: str = "motpe"
    seed: Optional[int] = None


@dataclass
class MedianPrunerConfig:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0


@dataclass
class HyperbandPrunerConfig:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class ThresholdPrunerConfig:
    """Prunes a trial whose eval loss leaves [lower, upper]."""

    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: Optional[float] = None
    upper: Optional[float] = None
    n_warmup_steps: int = 0


@dataclass
class WilcoxonPrunerConfig:
    """Prunes across a trial's repeats (hydra.sweeper.repeats): once its per-seed values are
    worse than the best trial's on the same seeds by a one-sided Wilcoxon signed-rank test."""

    _target_: str = "optuna.pruners.WilcoxonPruner"
    p_threshold: float = 0.1
    n_startup_steps: int = 2


@dataclass
class ConfirmConfig:
    """After the search: the top_k settings and a baseline, each run once per fresh seed."""

    top_k: int = knob(0, "settings confirmed after the search, best first; 0: no confirmation")
    seeds: List[int] = knob(help="fresh seeds each confirmed setting and the baseline run on",
                            factory=lambda: [101, 102, 103, 104, 105])
    baseline: Dict[str, Any] = knob(help="overrides of the reference setting, e.g. {selection.top_frac: 0.25, "
                                         "lora.r: 8}; empty: the fixed config itself", factory=dict)


@dataclass
class NopPrunerConfig:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class SpectraOptunaSweeperConf:
    """hydra/sweeper=spectraqlora_optuna: an Optuna study over the jobs' overrides."""

    _target_: str = SWEEPER
    # sampler and pruner stay configs: a resumed study reseeds the sampler, a grid sampler takes
    # its space from params, and training jobs build the same pruner
    _recursive_: bool = False
    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}])
    sampler: Any = knob(None, "hydra/sweeper/sampler=tpe (default), random, cmaes, gp, nsgaii, qmc or grid; "
                              "its keys are those of the optuna class")
    pruner: Any = knob(None, "hydra/sweeper/pruner=median (default), hyperband, threshold, wilcoxon or none")
    direction: Any = knob("minimize", "minimize or maximize, or a list of them (one per objective: multi-objective)")
    objectives: Optional[List[str]] = knob(None, "metrics.json keys of each finished run, one per direction; "
                                                 "null: the task's return value (the eval loss)")
    storage: Optional[str] = knob(None, "null: sqlite:///<sweep dir>/optuna.db; any SQLAlchemy URL "
                                        "(postgresql+psycopg://...) for workers on many machines, or "
                                        "journal:///<path> for a JournalStorage file on a shared file system")
    study_name: Optional[str] = knob(None, "null: derived from the sweep dir (give one for workers on several machines)")
    n_trials: int = knob(20, "in total, across resumes and all workers of the study", **positive())
    n_jobs: int = knob(1, "trials per launch, as in hydra-optuna-sweeper: one job array for submitit on SLURM; "
                          "Hydra's own launcher runs a batch one trial after another", **positive())
    workers: int = knob(1, "worker processes on this machine (Hydra's own launcher), each asking for its next "
                           "trial when free, sharing the study", **positive())
    max_failure_rate: float = knob(0.5, "the sweep stops once more than this fraction of n_trials has failed",
                                   check=lambda v: 0 <= v <= 1, accepted="a fraction in [0, 1]")
    heartbeat_interval: int = knob(60, "seconds between a running trial's heartbeats", **positive())
    grace_period: Optional[int] = knob(None, "seconds a running trial may go without a heartbeat before it "
                                             "counts as lost with its worker (FAIL); null: twice "
                                             "heartbeat_interval; longer than heartbeat_interval",
                                       **optional_positive())
    params: Optional[Dict[str, str]] = knob(None, "the search space: key -> choice(...), range(...), "
                                                  "interval(...), tag(log, ...)")
    custom_search_space: Optional[str] = knob(None, "dotted path of fn(cfg, trial), called before each trial to "
                                                    "suggest more params (as in hydra-optuna-sweeper); what it "
                                                    "suggests is passed to the job as overrides")
    repeats: int = knob(1, "runs per trial, one per seed of repeat_seeds (shared by every trial, so that trials "
                           "are paired); the trial's objective is their mean", **positive())
    repeat_seeds: Optional[List[int]] = knob(None, "the seeds of the repeats; null: [1, ..., repeats]")
    repeat_key: str = knob("seed", "the override each repeat's seed is passed as")
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)
    report_to: Optional[int] = knob(None, "set by the sweeper on the jobs of repeated trials, never by hand: "
                                          "the trial a job reports its eval losses to for pruning inside the run")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="spectraqlora_optuna", node=SpectraOptunaSweeperConf,
             provider="spectraqlora")
    samplers = {"tpe": TPESamplerConfig, "random": SamplerConfig, "cmaes": CmaEsSamplerConfig,
                "gp": GPSamplerConfig, "nsgaii": NSGAIISamplerConfig, "qmc": QMCSamplerConfig,
                "grid": GridSamplerConfig, "motpe": RemovedSamplerConfig}
    for name, node in samplers.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="spectraqlora")
    for name, node in {"median": MedianPrunerConfig, "hyperband": HyperbandPrunerConfig,
                       "threshold": ThresholdPrunerConfig, "wilcoxon": WilcoxonPrunerConfig,
                       "none": NopPrunerConfig}.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="spectraqlora")


register()
