"""The sweeper's config schema, registered with Hydra (compatible with hydra-optuna-sweeper's
keys where they mean the same: sampler, direction, storage, study_name, n_trials, n_jobs, params)."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConfig:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None


@dataclass
class GridSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.GridSampler"
    search_space: Optional[Dict[str, Any]] = None  # null: built from `params` (choices only)


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
class NopPrunerConfig:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class SpectraOptunaSweeperConf:
    _target_: str = "hydra_plugins.spectraqlora_optuna_sweeper.optuna_sweeper.SpectraOptunaSweeper"
    # sampler and pruner stay configs: a resumed study reseeds the sampler, a grid sampler takes
    # its space from params, and training jobs build the same pruner
    _recursive_: bool = False
    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}])
    sampler: Any = None
    pruner: Any = None
    # "minimize" / "maximize", or a list of them (one per objective: multi-objective)
    direction: Any = "minimize"
    # metrics.json keys of each finished run, one per direction; null: the task's return value
    objectives: Optional[List[str]] = None
    # null: sqlite:///<sweep dir>/optuna.db; any SQLAlchemy URL (postgresql+psycopg://...) for
    # workers on many machines, or journal:///<path> for a JournalStorage file on a shared
    # file system
    storage: Optional[str] = None
    study_name: str = "spectraqlora"
    n_trials: int = 20  # in total, across resumes and all workers of the study
    # Hydra's own launcher: that many workers on this machine, each asking for its next trial;
    # another launcher (submitit on SLURM): that many trials per launch, one job array
    n_jobs: int = 1
    # the sweep stops once more than this fraction of n_trials has failed
    max_failure_rate: float = 0.5
    heartbeat_interval: int = 60  # seconds between a running trial's heartbeats
    grace_period: Optional[int] = None  # silent this long: its worker died, FAIL; null: 2 x interval
    params: Optional[Dict[str, str]] = None


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="spectraqlora_optuna", node=SpectraOptunaSweeperConf,
             provider="spectraqlora")
    samplers = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler",
                "gp": "GPSampler", "nsgaii": "NSGAIISampler"}
    for name, cls in samplers.items():
        cs.store(group="hydra/sweeper/sampler", name=name, provider="spectraqlora",
                 node=SamplerConfig(_target_=f"optuna.samplers.{cls}"))
    cs.store(group="hydra/sweeper/sampler", name="grid", node=GridSamplerConfig, provider="spectraqlora")
    for name, node in {"median": MedianPrunerConfig, "hyperband": HyperbandPrunerConfig,
                       "threshold": ThresholdPrunerConfig, "none": NopPrunerConfig}.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="spectraqlora")


register()
