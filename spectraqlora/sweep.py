"""Optuna pieces shared by the sweeper (hydra_plugins/spectraqlora_optuna_sweeper) and the
training jobs it launches: the storage, the pruner, and the trial a job reports to."""
from __future__ import annotations

import warnings
from pathlib import Path

from hydra.types import RunMode

SWEEPER = "hydra_plugins.spectraqlora_optuna_sweeper.optuna_sweeper.SpectraOptunaSweeper"


def storage_url(storage: str | None, sweep_dir) -> str:
    """The configured storage, or an SQLite file in the sweep dir (optuna-dashboard reads it)."""
    return storage or f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def make_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """An RDB storage for SQLAlchemy URLs (with heartbeats, so that trials of a dead worker
    become FAIL), or a JournalStorage file for `journal:///path` (shared file systems)."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, grace_period=grace_period,
                                          heartbeat_interval=heartbeat_interval)


def make_pruner(pruner_cfg):
    """Pruners are not stored with the study: every process builds the same one from config."""
    from hydra.utils import instantiate

    return instantiate(pruner_cfg)


def current_trial(hydra_cfg):
    """The Optuna trial this training job runs as (its job number is the trial number), when
    spectraqlora's sweeper launched it; None otherwise and for multi-objective studies, which
    cannot prune."""
    if hydra_cfg.mode is not RunMode.MULTIRUN or hydra_cfg.sweeper.get("_target_") != SWEEPER:
        return None
    import optuna

    sweeper = hydra_cfg.sweeper
    storage = make_storage(storage_url(sweeper.storage, hydra_cfg.sweep.dir))
    study = optuna.load_study(study_name=sweeper.study_name, storage=storage,
                              pruner=make_pruner(sweeper.pruner))
    if len(study.directions) > 1:
        return None
    study_id = storage.get_study_id_from_name(sweeper.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, hydra_cfg.job.num)
    return optuna.trial.Trial(study, trial_id)
