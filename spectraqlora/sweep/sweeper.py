"""The sweep loop: ask/tell over Hydra's launcher (docs/sweeps.md).

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

from spectraqlora.config import range_errors
from spectraqlora.errors import UserError, exit_on_user_error
from spectraqlora.store import rundir
from spectraqlora.sweep import repeats as rep
from spectraqlora.sweep.confirm import CONFIRMATION, SETTINGS, Confirmation, summary
from spectraqlora.sweep.lifecycle import LOST, Heartbeat, dead_trials, failure_stop, lost
from spectraqlora.sweep.results import RESULTS, objective_names, plot_study, shown_url, write_results
from spectraqlora.sweep.schema import SpectraOptunaSweeperConf
from spectraqlora.sweep.space import (
    SEARCH,
    check_bounds,
    is_training_app,
    make_sampler,
    record_difference,
    search_record,
    search_space,
    suggest,
)
from spectraqlora.sweep.study import log_sweep_summary, make_pruner, make_storage, storage_url, study_lock, study_name
from spectraqlora.sweep.workers import WORKER_ENV, spawn_workers

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
    def __init__(self, **options):
        """`options`: the keys of SpectraOptunaSweeperConf as Hydra composed them (config.py holds
        their defaults, meanings and ranges; `_check` applies the ranges)."""
        o = self.options = SpectraOptunaSweeperConf(**options)
        self.sampler_cfg, self.pruner_cfg = o.sampler, o.pruner  # configs (_recursive_: false)
        self.directions = list(o.direction) if isinstance(o.direction, (list, ListConfig)) else [o.direction]
        self.objectives = list(o.objectives) if o.objectives else None
        self.storage, self.study_name, self.params = o.storage, o.study_name, o.params or {}
        self.plotted_at = time.monotonic()  # of the last plots (or the start)
        self.n_trials, self.n_jobs, self.max_failure_rate = o.n_trials, o.n_jobs, o.max_failure_rate
        self.workers = 1 if os.environ.get(WORKER_ENV) else o.workers  # a worker never starts more
        self.heartbeat_interval = o.heartbeat_interval
        self.grace_period = o.grace_period or 2 * o.heartbeat_interval  # null: twice the interval
        self.exhausted = False  # a grid sampler has run its whole grid
        self.custom_search_space = o.custom_search_space
        self.repeats_cfg = dict(repeats=o.repeats, seeds=o.repeat_seeds, key=o.repeat_key, confirm=o.confirm,
                                report_to=o.report_to)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.task_function, self.config_loader = config, task_function, hydra_context.config_loader
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
        rep.check_key(self.repeats, fixed, space)
        if is_training_app(self.task_function):
            check_bounds(self.config_loader, self.config, fixed, space)
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
        self.storage_obj = make_storage(self.url)
        with self._lock():  # the first workers of a new study all want to create it
            study = optuna.create_study(study_name=self.study_name, storage=self.storage_obj,
                                        pruner=make_pruner(self.pruner_cfg),
                                        directions=self.directions, load_if_exists=True)
            self._check_joined(study, search_record(fixed, space, self.repeats))
        make_sampler(self.sampler_cfg, space, 0)  # a bad sampler config fails before any trial
        rundir.write_text(self.sweep_dir / "multirun.yaml", OmegaConf.to_yaml(shown))
        done = sum(not lost(t) for t in study.trials)
        log.info("study %s in %s: %d trials so far, %d to go", self.study_name, shown_url(self.url),
                 done, max(0, self.n_trials - done))
        if done >= self.n_trials:
            log.warning("study %s already has its hydra.sweeper.n_trials=%d trials: nothing new runs, and "
                        "the results below are those of its earlier trials (raise n_trials to run more)",
                        self.study_name, self.n_trials)
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
        if self.confirm:
            self._confirm(study, fixed)

    def _confirm(self, study: optuna.Study, fixed: list[str]) -> None:
        """The confirmation stage: the settings are chosen once, by the first worker to get
        here; every worker then takes the next waiting one (a lost one waits again)."""
        with self._lock():
            confirm = optuna.create_study(study_name=f"{self.study_name}-confirm", storage=self.storage_obj,
                                          directions=self.directions, load_if_exists=True)
            if SETTINGS not in confirm.user_attrs:
                settings = self.confirm.settings(study, fixed)
                for setting in settings:
                    confirm.enqueue_trial({}, user_attrs={rep.CONFIRM: setting})
                confirm.set_user_attr(SETTINGS, settings)
        log.info("confirmation: %s on seeds %s", ", ".join(s["name"] for s in confirm.user_attrs[SETTINGS]),
                 self.confirm.seeds)
        while True:
            with self._lock():
                self._fail_dead_trials(confirm)
                waiting = confirm.get_trials(deepcopy=False, states=(State.WAITING,))
                trial = confirm.ask() if waiting else None
            if trial is None:
                if self._wait_for_running_trials(confirm):
                    continue
                break
            self._claim(trial)
            setting = trial.user_attrs[rep.CONFIRM]
            log.info("confirmation trial %d: %s %s", trial.number, setting["name"], " ".join(setting["overrides"]))
            self.run_repeated(confirm, [trial], [setting["overrides"]], self.confirm.repeats(),
                              in_run_pruning=False, subdir="confirm/")
            self.confirm.write(confirm, self.sweep_dir)
        results = self.confirm.write(confirm, self.sweep_dir)
        log.info("%s:\n%s", self.sweep_dir / CONFIRMATION, (self.sweep_dir / CONFIRMATION).read_text())
        log.info(summary(results))

    def _check_joined(self, study: optuna.Study, record: dict) -> None:
        """A study searches one thing: joining one made for other directions, fixed overrides,
        search space or repeats is refused (call under the study lock); a new study records it."""
        where = f"study {self.study_name} in {shown_url(self.url)}"
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in self.directions]:
            raise UserError(f"{where} has directions {[d.name.lower() for d in study.directions]}, "
                            f"not {self.directions}")
        known = study.user_attrs.get(SEARCH)
        if known is None:
            if not study.trials:  # (a study from before records were kept is joined as it is)
                study.set_user_attr(SEARCH, record)
            return
        if differs := record_difference(known, record):
            raise UserError(f"{where} searches something else ({differs}): give this search its own "
                            f"hydra.sweeper.study_name (or sweep dir), or drop the differing overrides")

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
            # a lost trial does not count (with repeats, its retry waits to be asked)
            left = self.n_trials - sum(not lost(t) and t.state is not State.WAITING for t in every)
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
            self._claim(trial)
            for name, dist in space.items():
                suggest(trial, name, dist)
            if self.extend_space:
                self.extend_space(self.config, trial)
            for override in fixed:  # as hydra-optuna-sweeper records them
                trial.set_user_attr(*override.split("=", 1))
            params = [f"{name}={value}" for name, value in trial.params.items()]
            log.info("trial %d: %s", trial.number, " ".join(params))
            jobs.append(fixed + params)
        if self.repeats:
            self.run_repeated(study, trials, jobs, self.repeats, in_run_pruning=True)
            return
        returns = self._launch(study, trials, jobs, initial_job_idx=trials[0].number)
        for trial, ret in zip(trials, returns):
            self._record(study, trial, ret)

    @staticmethod
    def _claim(trial: optuna.Trial) -> None:
        """Whose trial it is: a dead process on this machine fails it at once (lifecycle)."""
        trial.set_user_attr("worker_host", socket.gethostname())
        trial.set_user_attr("worker_pid", os.getpid())

    def _launch(self, study: optuna.Study, trials: list[optuna.Trial], jobs: list[list[str]],
                initial_job_idx: int):
        """One launch, with heartbeats for `trials`; a Ctrl-C or a launcher that died leaves
        none of them RUNNING (with repeats, each is asked again)."""
        heartbeat = Heartbeat(self.storage_obj, [self._trial_id(study, t.number) for t in trials],
                              self.heartbeat_interval)
        try:
            return self.launcher.launch(jobs, initial_job_idx=initial_job_idx)
        except BaseException as exc:
            for trial in trials:
                trial.set_user_attr(LOST, True)
                self._fail(study, trial, f"interrupted: {type(exc).__name__}")
                if self.repeats:
                    rep.retry(study, self.storage_obj.get_trial(self._trial_id(study, trial.number)))
            raise
        finally:
            heartbeat.stop()

    def _finished_elsewhere(self, study: optuna.Study, trial: optuna.Trial, run_dir) -> bool:
        told = self.storage_obj.get_trial(self._trial_id(study, trial.number))
        if told.state.is_finished():  # marked FAIL by a worker that missed our heartbeats
            log.warning("trial %d was marked %s by another worker while it ran (%s); its run dir "
                        "%s keeps what it wrote", trial.number, told.state.name,
                        told.user_attrs.get("error"), run_dir)
        return told.state.is_finished()

    def _record(self, study: optuna.Study, trial: optuna.Trial, ret) -> None:
        run_dir = ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg else None
        if self._finished_elsewhere(study, trial, run_dir):
            return
        if run_dir:
            trial.set_user_attr("run_dir", str(run_dir))
        outcome, result = self._outcome(ret, run_dir)
        if outcome == "values":
            self._complete(study, trial, result)
        elif outcome == "pruned":
            self._tell(study, trial, state=State.PRUNED)
            log.info("trial %d pruned (%s)", trial.number, result)
        else:
            self._fail(study, trial, result)

    def _outcome(self, ret, run_dir) -> tuple[str, object]:
        """("values", the job's objectives), ("pruned", the exception) or ("fail", why)."""
        if ret.status is not JobStatus.COMPLETED:
            exc = _raised(ret)
            if isinstance(exc, optuna.TrialPruned):
                return "pruned", exc
            return "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        try:
            values = self._objectives(ret, run_dir)
        except (UserError, OSError, KeyError, TypeError, ValueError) as exc:
            return "fail", f"no objective: {exc}"
        if len(values) != len(self.directions):
            return "fail", (f"the task returned {len(values)} value(s) {values} for "
                            f"{len(self.directions)} objective(s) (hydra.sweeper.direction)")
        if not all(math.isfinite(v) for v in values):
            return "fail", f"objective is {values}"
        return "values", values

    def _complete(self, study: optuna.Study, trial: optuna.Trial, values: list[float]) -> None:
        self._tell(study, trial, values)
        log.info("trial %d: %s = %s", trial.number, ", ".join(objective_names(self.objectives, self.directions)),
                 ", ".join(f"{v:.6g}" for v in values))

    def run_repeated(self, study: optuna.Study, trials: list[optuna.Trial], jobs: list[list[str]],
                     repeats: rep.Repeats, in_run_pruning: bool, subdir: str = "") -> None:
        """Each trial's setting once per seed of `repeats`; its objective the mean over them.
        Hydra's own launcher, and a Wilcoxon pruner, run one repeat of every trial per launch,
        so that each finished repeat is recorded (and can prune) before the next starts; other
        launchers get all repeats of the batch in one launch, to run in parallel. The first
        repeat of a search trial reports its eval losses to the trial (pruning inside the run:
        every trial's first repeat has the same seed); the others report nothing."""
        done = {t.number: rep.carried(study, t, repeats) for t in trials}
        for trial in trials:
            if done[trial.number]:  # a retry: what it took over is its own from now on
                rep.record(trial, repeats, done[trial.number])
        live = list(trials)
        per_launch = 1 if repeats.across or self.local else len(repeats.seeds)
        while live:
            batch = [(t, i) for t in live for i in [i for i in range(len(repeats.seeds))
                                                      if i not in done[t.number]][:per_launch]]
            overrides = [rep.job_overrides(jobs[trials.index(t)], repeats, i, f"{subdir}{t.number}",
                                           t.number if in_run_pruning and i == 0 and not repeats.across else None)
                         for t, i in batch]
            returns = self._launch(study, live, overrides, initial_job_idx=batch[0][0].number)
            for (trial, i), ret in zip(batch, returns):
                run_dir = ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg else None
                if trial not in live or self._finished_elsewhere(study, trial, run_dir):
                    live = [t for t in live if t is not trial]
                    continue
                outcome, result = self._outcome(ret, run_dir)
                seed = f"{repeats.key}={repeats.seeds[i]}"
                if outcome == "values":
                    done[trial.number][i] = (result, str(run_dir))
                    trial.set_user_attr("run_dir", str(Path(run_dir).parent))  # the trial's, above its repeats'
                    rep.record(trial, repeats, done[trial.number])
                    if repeats.across:
                        trial.report(result[0], i)  # the seed's index: the pruner pairs by it
                    continue
                live.remove(trial)
                if outcome == "pruned":
                    self._tell(study, trial, state=State.PRUNED)
                    log.info("trial %d pruned at %s (%s)", trial.number, seed, result)
                else:
                    self._fail(study, trial, f"repeat {seed}: {result}")
            for trial in list(live):
                values = [done[trial.number][i][0] for i in sorted(done[trial.number])]
                if len(values) == len(repeats.seeds):
                    live.remove(trial)
                    self._complete(study, trial, rep.mean(values))
                elif repeats.across and trial.should_prune():
                    live.remove(trial)
                    self._tell(study, trial, state=State.PRUNED)
                    log.info("trial %d pruned after %d of %d repeats: worse than the best trial on "
                             "the same seeds (Wilcoxon)", trial.number, len(values), len(repeats.seeds))

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
        if error := next(range_errors(self.options, "hydra.sweeper."), None):
            raise UserError(error)
        cfg = self.repeats_cfg
        if cfg["report_to"] is not None:
            raise UserError(f"hydra.sweeper.report_to={cfg['report_to']}: the sweeper sets it on the "
                            f"jobs it launches; drop it")
        self.repeats = rep.configured(cfg["repeats"], cfg["seeds"], cfg["key"], self.pruner_cfg, len(self.directions))
        self.confirm = Confirmation.configured(cfg["confirm"], self.repeats, len(self.directions), cfg["key"])
        if self.workers > 1 and not self.local:
            raise UserError(f"hydra.sweeper.workers={self.workers} starts processes on this machine, "
                            f"for Hydra's basic launcher; with hydra/launcher="
                            f"{type(self.launcher).__name__} use hydra.sweeper.n_jobs (trials per launch)")
        if self.grace_period <= self.heartbeat_interval:
            raise UserError(f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval} and "
                            f"grace_period={self.grace_period}: the grace period must be longer than "
                            f"the interval (default: twice the interval)")
        bad = [d for d in self.directions if d not in ("minimize", "maximize")]
        if bad:
            raise UserError(f"hydra.sweeper.direction={bad[0]}: expected minimize or maximize")
        if self.objectives and len(self.objectives) != len(self.directions):
            raise UserError(f"hydra.sweeper.objectives has {len(self.objectives)} names but "
                            f"hydra.sweeper.direction {len(self.directions)}: give one per objective")

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        """FAIL the trials left RUNNING by a dead worker (call under the study lock); with
        repeats, each is asked again."""
        for number, error in dead_trials(study, self.grace_period):
            trial_id = self._trial_id(study, number)
            self.storage_obj.set_trial_user_attr(trial_id, "error", error)
            self.storage_obj.set_trial_user_attr(trial_id, LOST, True)
            self._tell(study, number, state=State.FAIL)
            log.warning("trial %d FAIL: %s", number, error)
            if self.repeats:
                rep.retry(study, self.storage_obj.get_trial(trial_id))

    def _trial_id(self, study: optuna.Study, number: int) -> int:
        storage = self.storage_obj
        return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)

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
        table, results = write_results(study, self.sweep_dir, names, self.directions, self.url, self.repeats)
        plots = []
        if final or time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
            complete = sum(t.state is State.COMPLETE for t in study.get_trials(deepcopy=False))
            plots = plot_study(study, names, complete, self.sweep_dir, self.repeats)
            self.plotted_at = time.monotonic()
        if final:
            log.info("%s:\n%s", self.sweep_dir / RESULTS, (self.sweep_dir / RESULTS).read_text())
            if results.get("distinguishable") is False:
                log.warning(rep.undistinguished(len(self.repeats.seeds)))
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
