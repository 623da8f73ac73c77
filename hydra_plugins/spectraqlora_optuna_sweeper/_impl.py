"""The sweep loop: ask/tell over Hydra's launcher (README, "Sweeps" and "Scaling out").

Any number of workers, on any machines, share one study: each asks for its next trial under a
study-wide lock, so that they start exactly n_trials between them. Job number = trial number,
so `<sweep dir>/<n>/` is trial n across resumes and workers. A trial that fails, gives NaN or
runs out of memory is recorded FAIL with its error and the sweep goes on; a trial whose worker
died is FAIL once its heartbeat is older than the grace period, and no worker leaves while a
trial is RUNNING. Results files are rewritten (atomically) after every trial, plots at most every
PLOT_EVERY_S and at the end; the worker that ends the study writes the W&B summary.

The loop (ask, run, record, wait) stays in one class and file, just over 300 lines, so that it
reads top to bottom; what it calls lives in space, lifecycle, workers and results.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
from pathlib import Path

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_plugins.spectraqlora_optuna_sweeper.lifecycle import LOST, Heartbeat, dead_trials, failure_stop, lost
from hydra_plugins.spectraqlora_optuna_sweeper.results import (RESULTS, objective_names, plot_study, shown_url,
                                                              write_results)
from hydra_plugins.spectraqlora_optuna_sweeper.space import make_sampler, search_space, suggest
from hydra_plugins.spectraqlora_optuna_sweeper.workers import WORKER_ENV, spawn_workers
from spectraqlora import rundir
from spectraqlora.errors import UserError, exit_on_user_error
from spectraqlora.sweep import (log_sweep_summary, make_pruner, make_storage, storage_url, study_lock,
                                study_name)

log = logging.getLogger(__name__)
State = optuna.trial.TrialState
SUMMARY = "summary_written_at"  # study user attr: trial count when the W&B summary was written
PLOT_EVERY_S = 60  # plots are redrawn at most this often while a sweep runs, and at its end


def _raised(ret) -> BaseException:
    """The exception a failed job raised (JobReturn.return_value re-raises it)."""
    try:
        ret.return_value
    except BaseException as exc:
        return exc
    return RuntimeError(f"job status {ret.status}")


class SweeperImpl:
    def __init__(self, sampler, pruner, direction, objectives, storage, study_name, n_trials,
                 n_jobs, max_failure_rate, heartbeat_interval, grace_period, params,
                 custom_search_space=None, workers=1):
        self.sampler_cfg, self.pruner_cfg = sampler, pruner  # configs (_recursive_: false)
        self.directions = list(direction) if isinstance(direction, (list, ListConfig)) else [direction]
        self.objectives = list(objectives) if objectives else None
        self.storage, self.study_name, self.params = storage, study_name, params or {}
        self.plotted_at = time.monotonic()  # of the last plots (or the start)
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.workers = 1 if os.environ.get(WORKER_ENV) else workers  # a worker never starts more
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period or 2 * heartbeat_interval
        self.exhausted = False  # a grid sampler has run its whole grid
        self.custom_search_space = custom_search_space

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.task_function = config, task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.study_name = study_name(config.hydra.sweeper, self.sweep_dir)
        # Hydra's own launcher runs jobs in this process: `workers` > 1 means more processes
        self.local = type(self.launcher).__name__ == "BasicLauncher"

    def sweep(self, arguments: list[str]) -> None:
        with exit_on_user_error():
            self._sweep(arguments)

    # -- the loop ---------------------------------------------------------------------------

    def _sweep(self, arguments: list[str]) -> None:
        self._check()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        fixed, space = search_space(self.params, arguments)
        if not space:
            log.info("no search space (hydra.sweeper.params): n_trials=%d runs of the fixed config", self.n_trials)
        self.extend_space = None
        if self.custom_search_space:
            try:
                self.extend_space = get_method(self.custom_search_space)
            except Exception as exc:
                raise UserError(f"hydra.sweeper.custom_search_space={self.custom_search_space}: "
                                f"{str(exc).splitlines()[0]}") from None
        self.url = storage_url(self.storage, self.sweep_dir)
        shown = OmegaConf.to_container(self.config)  # interpolations stay as written
        if self.storage and "${" not in str(shown["hydra"]["sweeper"]["storage"]):
            shown["hydra"]["sweeper"]["storage"] = shown_url(self.url)  # no password on disk
        rundir.write_text(self.sweep_dir / "multirun.yaml", OmegaConf.to_yaml(shown))
        self.storage_obj = make_storage(self.url)
        with self._lock():  # the first workers of a new study all want to create it
            study = optuna.create_study(study_name=self.study_name, storage=self.storage_obj,
                                        pruner=make_pruner(self.pruner_cfg),
                                        directions=self.directions, load_if_exists=True)
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in self.directions]:
            raise UserError(f"study {self.study_name} in {shown_url(self.url)} has directions "
                            f"{[d.name.lower() for d in study.directions]}, not {self.directions}")
        make_sampler(self.sampler_cfg, space, 0)  # a bad sampler config fails before any trial
        done = len(study.trials)
        log.info("study %s in %s: %d trials so far, %d to go", self.study_name, shown_url(self.url),
                 done, max(0, self.n_trials - done))
        workers = spawn_workers(self.workers, self.task_function, self.config.hydra, self.url,
                                self.study_name, self.sweep_dir)
        try:
            while True:
                if trials := self._next_trials(study, space):
                    self._run(study, trials, fixed, space)
                    self._write_results(study)
                elif not self._wait_for_running_trials(study):  # a lost trial frees its place
                    break
        finally:
            for worker in workers:
                if worker.wait() != 0:
                    log.warning("sweep worker pid %d exited with %d", worker.pid, worker.returncode)
        self._write_results(study, final=True)
        if stop := self._failure_stop(study):
            raise UserError(stop)

    def _lock(self):
        return study_lock(self.url, self.study_name)

    def _next_trials(self, study: optuna.Study, space: dict) -> list[optuna.Trial]:
        """The next trials for this worker (a batch of n_jobs, one launch),
        none once the study has n_trials that ran or run (lost ones do not count); asked under
        the study lock, so their numbers follow each other and no worker starts one too many."""
        with self._lock():
            self._fail_dead_trials(study)
            stop = self._failure_stop(study)
            every = study.get_trials(deepcopy=False)
            left = self.n_trials - sum(not lost(t) for t in every)  # a lost trial is asked again
            if stop or self.exhausted or left <= 0:
                trials = []
            else:
                study.sampler = make_sampler(self.sampler_cfg, space, len(every))
                trials = [study.ask() for _ in range(min(self.n_jobs, left))]
        if stop:
            self._write_results(study, final=True)
            raise UserError(stop)
        return trials

    def _run(self, study: optuna.Study, trials: list[optuna.Trial], fixed: list[str],
             space: dict) -> None:
        jobs = []
        for trial in trials:
            trial.set_user_attr("worker_host", socket.gethostname())
            trial.set_user_attr("worker_pid", os.getpid())
            for name, dist in space.items():
                suggest(trial, name, dist)
            if self.extend_space:
                self.extend_space(self.config, trial)
            for override in fixed:  # as hydra-optuna-sweeper records them
                trial.set_user_attr(*override.split("=", 1))
            params = [f"{name}={value}" for name, value in trial.params.items()]
            log.info("trial %d: %s", trial.number, " ".join(params))
            jobs.append(fixed + params)
        heartbeat = Heartbeat(self.storage_obj, [self._trial_id(t.number) for t in trials], self.heartbeat_interval)
        try:
            returns = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
        except BaseException as exc:  # Ctrl-C, or a launcher that died: never left RUNNING
            for trial in trials:
                trial.set_user_attr(LOST, True)
                self._fail(study, trial, f"interrupted: {type(exc).__name__}")
            raise
        finally:
            heartbeat.stop()
        for trial, ret in zip(trials, returns):
            self._record(study, trial, ret)

    def _record(self, study: optuna.Study, trial: optuna.Trial, ret) -> None:
        run_dir = ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg else None
        told = self.storage_obj.get_trial(self._trial_id(trial.number))
        if told.state.is_finished():  # marked FAIL by a worker that missed our heartbeats
            log.warning("trial %d was marked %s by another worker while it ran (%s); its run dir "
                        "%s keeps what it wrote", trial.number, told.state.name,
                        told.user_attrs.get("error"), run_dir)
            return
        if run_dir:
            trial.set_user_attr("run_dir", str(run_dir))
        if ret.status is not JobStatus.COMPLETED:
            exc = _raised(ret)
            if isinstance(exc, optuna.TrialPruned):
                self._tell(study, trial, state=State.PRUNED)
                log.info("trial %d pruned (%s)", trial.number, exc)
            else:
                self._fail(study, trial, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return
        try:
            values = self._objectives(ret, run_dir)
        except (UserError, OSError, KeyError, TypeError, ValueError) as exc:
            self._fail(study, trial, f"no objective: {exc}")
            return
        if len(values) != len(self.directions):
            self._fail(study, trial, f"the task returned {len(values)} value(s) {values} for "
                                     f"{len(self.directions)} objective(s) (hydra.sweeper.direction)")
            return
        if not all(math.isfinite(v) for v in values):
            self._fail(study, trial, f"objective is {values}")
            return
        self._tell(study, trial, values)
        log.info("trial %d: %s = %s", trial.number, ", ".join(objective_names(self.objectives, self.directions)),
                 ", ".join(f"{v:.6g}" for v in values))

    def _objectives(self, ret, run_dir) -> list[float]:
        if not self.objectives:
            value = ret.return_value
            return [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        metrics = rundir.read_json(Path(run_dir) / rundir.METRICS)
        return [float(metrics[key]) for key in self.objectives]

    def _tell(self, study: optuna.Study, trial, values=None, state=None) -> None:
        """study.tell; a grid sampler that has run its whole grid calls Study.stop, which only
        works inside Study.optimize: the trial is recorded all the same, and the sweep ends."""
        try:
            study.tell(trial, values, state=state, skip_if_finished=True)
        except RuntimeError as exc:
            if "Study.stop" not in str(exc):
                raise
            self.exhausted = True

    def _fail(self, study: optuna.Study, trial: optuna.Trial, error: str) -> None:
        trial.set_user_attr("error", error)
        self._tell(study, trial, state=State.FAIL)
        log.warning("trial %d failed: %s", trial.number, error)

    # -- set-up -----------------------------------------------------------------------------

    def _check(self) -> None:
        if min(self.n_trials, self.n_jobs, self.workers) <= 0:
            raise UserError("hydra.sweeper.n_trials, n_jobs and workers must be positive")
        if self.workers > 1 and not self.local:
            raise UserError(f"hydra.sweeper.workers={self.workers} starts processes on this machine, "
                            f"for Hydra's basic launcher; with hydra/launcher="
                            f"{type(self.launcher).__name__} use hydra.sweeper.n_jobs (trials per launch)")
        if self.heartbeat_interval <= 0 or self.grace_period <= self.heartbeat_interval:
            raise UserError(f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval} and "
                            f"grace_period={self.grace_period}: the interval must be positive and "
                            f"the grace period longer than it (default: twice the interval)")
        if not 0 <= self.max_failure_rate <= 1:
            raise UserError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate} is out of "
                            f"range: expected a fraction in [0, 1]")
        bad = [d for d in self.directions if d not in ("minimize", "maximize")]
        if bad:
            raise UserError(f"hydra.sweeper.direction={bad[0]}: expected minimize or maximize")
        if self.objectives and len(self.objectives) != len(self.directions):
            raise UserError(f"hydra.sweeper.objectives has {len(self.objectives)} names but "
                            f"hydra.sweeper.direction {len(self.directions)}: give one per objective")

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        """FAIL the trials left RUNNING by a dead worker (call under the study lock)."""
        for number, error in dead_trials(study, self.grace_period):
            trial_id = self._trial_id(number)
            self.storage_obj.set_trial_user_attr(trial_id, "error", error)
            self.storage_obj.set_trial_user_attr(trial_id, LOST, True)
            self._tell(study, number, state=State.FAIL)
            log.warning("trial %d FAIL: %s", number, error)

    def _trial_id(self, number: int) -> int:
        storage = self.storage_obj
        return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.study_name), number)

    def _wait_for_running_trials(self, study: optuna.Study) -> bool:
        """Before leaving, wait until no trial is RUNNING: each one finishes in its own worker
        or, once its heartbeat is older than the grace period, is FAIL here. Leaving earlier,
        whatever the age of a running trial, could leave it RUNNING for good if its worker has
        just died. True when it waited (a lost trial may have freed a place to ask again)."""
        shown = None
        while True:
            with self._lock():
                self._fail_dead_trials(study)
            running = [t.number for t in study.get_trials(deepcopy=False, states=(State.RUNNING,))]
            if not running:
                return shown is not None
            if running != shown:
                log.info("waiting for trials %s of other workers to finish (FAIL after %d s "
                         "without a heartbeat)", running, self.grace_period)
                shown = running
            time.sleep(min(self.heartbeat_interval, 5))

    def _failure_stop(self, study: optuna.Study) -> str | None:
        return failure_stop(study, self.max_failure_rate, self.n_trials)

    # -- results ----------------------------------------------------------------------------

    def _write_results(self, study: optuna.Study, final: bool = False) -> None:
        names = objective_names(self.objectives, self.directions)
        table = write_results(study, self.sweep_dir, names, self.directions, self.url)
        plots = []
        if final or time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
            complete = sum(t.state is State.COMPLETE for t in study.get_trials(deepcopy=False))
            plots = plot_study(study, names, complete, self.sweep_dir)
            self.plotted_at = time.monotonic()
        if final:
            log.info("%s:\n%s", self.sweep_dir / RESULTS, (self.sweep_dir / RESULTS).read_text())
            if self._claim_summary(study):
                log_sweep_summary(self.config, self.study_name, self.sweep_dir, table, plots)

    def _claim_summary(self, study: optuna.Study) -> bool:
        """True for the one worker that ends the study (no trial running); later resumes that
        add trials sum up again."""
        with self._lock():
            trials = study.get_trials(deepcopy=False)
            if any(t.state is State.RUNNING for t in trials) or study.user_attrs.get(SUMMARY) == len(trials):
                return False
            study.set_user_attr(SUMMARY, len(trials))
            return True
