"""Optuna in spectraqlora, both sides of it: what the sweeper (hydra_plugins/
spectraqlora_optuna_sweeper) and the training jobs it launches share (the study's name, storage,
locks and pruner), the trial a job reports to (run/loop.py's PruningCallback reports to it), and the sweep's
summary in W&B."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from hydra.types import RunMode
from omegaconf import OmegaConf

from spectraqlora.errors import UserError

# the sweeper class, as hydra.sweeper._target_ names it
SWEEPER = "hydra_plugins.spectraqlora_optuna_sweeper.optuna_sweeper.SpectraOptunaSweeper"


def study_name(sweeper_cfg, sweep_dir) -> str:
    """hydra.sweeper.study_name, or when null one derived from the sweep dir
    (`multirun/2026-11-29/12-00-00` -> `2026-11-29_12-00-00`): every trial and resume of that
    dir finds it; workers on several machines need a name of their own choosing."""
    sweep_dir = Path(sweep_dir)
    return sweeper_cfg.get("study_name") or f"{sweep_dir.parent.name}_{sweep_dir.name}"


def storage_url(storage: str | None, sweep_dir) -> str:
    """The configured storage, or an SQLite file in the sweep dir (optuna-dashboard reads it).
    A bare postgresql:// URL takes psycopg (3), the driver of the [postgres] extra."""
    if storage and storage.startswith("postgresql://"):
        return storage.replace("postgresql://", "postgresql+psycopg://", 1)
    return storage or f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def make_storage(url: str):
    """An RDB storage for SQLAlchemy URLs (sqlite, postgresql+psycopg, mysql), or a
    JournalStorage file for `journal:///path` (clusters with a shared file system and no
    database server). Building an RDB storage creates Optuna's schema in a new database, which
    workers started together would race to do (optuna issue #1092): it is built under a lock."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with named_lock(url, "optuna-schema"):
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except ImportError:  # optuna's own message does not name the driver
        scheme = url.split("://")[0]
        raise UserError(f"hydra.sweeper.storage: no database driver for {scheme}:// is installed"
                        + ('; pip install "spectraqlora[postgres]" (psycopg 3, used for postgresql://)'
                           if scheme.startswith("postgresql") else "")) from None


def study_lock(url: str, study_name: str):
    """Held by a sweep worker while it counts the study's trials and asks for new ones, so that
    workers on many machines start exactly n_trials between them."""
    return named_lock(url, study_name)


@contextmanager
def named_lock(url: str, name: str):
    """A lock shared by every process using the storage at `url`: a PostgreSQL advisory lock
    (MySQL: GET_LOCK) on a connection of its own, which the server drops with its process; for
    SQLite and journal files, a lock file beside them (NFS-safe, broken after 30 s by others if
    its holder died)."""
    if url.startswith(("postgresql", "mysql")):
        from sqlalchemy import create_engine, pool, text

        key = f"spectraqlora:{name}"
        lock, unlock = (("SELECT pg_advisory_lock(hashtext(:n))", "SELECT pg_advisory_unlock(hashtext(:n))")
                        if url.startswith("postgresql") else
                        ("SELECT GET_LOCK(:n, -1)", "SELECT RELEASE_LOCK(:n)"))
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text(lock), {"n": key})
                try:
                    yield
                finally:
                    conn.execute(text(unlock), {"n": key})
        finally:
            engine.dispose()
        return
    from optuna.storages.journal import JournalFileOpenLock

    path = url.removeprefix("journal://") if url.startswith("journal://") else url.removeprefix("sqlite:///")
    lock = JournalFileOpenLock(f"{path}.{name}")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def make_pruner(pruner_cfg):
    """Pruners are not stored with the study: every process builds the same one from config."""
    import warnings

    from hydra.utils import instantiate
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():  # WilcoxonPruner's "experimental" on every start
        warnings.simplefilter("ignore", ExperimentalWarning)
        return instantiate(pruner_cfg)


def current_trial(hydra_cfg):
    """The Optuna trial this training job reports its eval losses to, when spectraqlora's sweeper
    launched it: the trial its job number is, or with repeats the one the sweeper named in the
    job's `hydra.sweeper.report_to` (only a trial's first repeat has one). None otherwise and for
    multi-objective studies, which cannot prune."""
    if hydra_cfg.mode is not RunMode.MULTIRUN or hydra_cfg.sweeper.get("_target_") != SWEEPER:
        return None
    import optuna

    sweeper = hydra_cfg.sweeper
    repeated = any(o.startswith("hydra.sweeper.report_to=") for o in hydra_cfg.overrides.hydra)
    number = sweeper.get("report_to") if repeated else hydra_cfg.job.num
    if number is None:
        return None
    name = study_name(sweeper, hydra_cfg.sweep.dir)
    storage = make_storage(storage_url(sweeper.storage, hydra_cfg.sweep.dir))
    study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(sweeper.pruner))
    if len(study.directions) > 1:
        return None
    study_id = storage.get_study_id_from_name(name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    return optuna.trial.Trial(study, trial_id)


def log_sweep_summary(config, study_name: str, sweep_dir: Path, table, plots: list[Path]) -> None:
    """With logger=wandb: the sweep's trials table and plots as a W&B run of job_type
    sweep-summary, grouped with its trials (they stay as files in the sweep dir either way)."""
    if OmegaConf.select(config, "logger.name") != "wandb":
        return
    from spectraqlora.run.telemetry import Telemetry, init_wandb

    sweeper = config.hydra.sweeper

    run = init_wandb(
        project=OmegaConf.select(config, "logger.project"),
        entity=OmegaConf.select(config, "logger.entity"),
        name=f"{study_name} summary", group=study_name, job_type="sweep-summary", dir=str(sweep_dir),
        config={"study_name": study_name, "n_trials": sweeper.n_trials,
                "direction": OmegaConf.to_container(sweeper.direction) if OmegaConf.is_list(
                    sweeper.direction) else sweeper.direction,
                "params": OmegaConf.to_container(sweeper.params or {}, resolve=True)})
    sink = Telemetry(sweep_dir, run)
    when = table.select_dtypes(include=["datetime", "timedelta"]).columns

    def send(run):
        import wandb

        run.log({"trials": wandb.Table(dataframe=table.astype({c: str for c in when})),
                 **{p.stem: wandb.Image(str(p)) for p in plots}})

    sink.to_wandb(send)
    sink.finish(failed=False)
