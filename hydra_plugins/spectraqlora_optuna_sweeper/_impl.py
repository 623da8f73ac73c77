"""Ask/tell over Hydra's launcher (README, "Sweeps" and "Scaling out").

Any number of workers, on any machines, share one study: each asks for its next trial under a
study-wide lock, so that they start exactly n_trials between them. Job number = trial number,
so `<sweep dir>/<n>/` is trial n across resumes and workers. A trial that fails, gives NaN or
runs out of memory is recorded FAIL with its error and the sweep goes on; a trial whose worker
died is FAIL once its heartbeat is older than the grace period, and no worker leaves while a
trial is RUNNING. Results files are rewritten (atomically) after every trial, plots at most every
PLOT_EVERY_S and at the end; the worker that ends the study writes the W&B summary.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (ChoiceSweep, IntervalSweep, Override, RangeSweep,
                                              Transformer)
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from spectraqlora import rundir
from spectraqlora.errors import UserError, exit_on_user_error
from spectraqlora.sweep import (log_sweep_summary, make_pruner, make_storage, storage_url, study_lock,
                                study_name)

log = logging.getLogger(__name__)
State = optuna.trial.TrialState
RESULTS = "optimization_results.yaml"
HEARTBEAT = "heartbeat"  # trial user attr: time.time() of the worker's last sign of life
WORKER_ENV = "SPECTRAQLORA_SWEEP_WORKER"  # set in the workers a sweep starts: they start none
LOST = "worker_lost"  # trial user attr: FAIL because its worker died or was stopped, not by its own error
SUMMARY = "summary_written_at"  # study user attr: trial count when the W&B summary was written
_SAMPLER_PACKAGES = {"CmaEsSampler": ("cmaes", "cmaes")}  # optuna sampler -> (package, our extra)
PLOT_EVERY_S = 60  # plots are redrawn at most this often while a sweep runs, and at its end


def distribution(override: Override):
    """The Optuna distribution of a sweep override (choice, range, interval with tags log/int),
    or None for a plain value."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        # range(a, b, step) includes b when it is on the step grid, for ints and floats alike, as
        # hydra-optuna-sweeper reads it (Hydra's basic sweeper, like Python, stops before b)
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise UserError(f"{override.input_line}: not a search space Optuna can sample")


def removed_sampler(name: str, seed=None):
    raise UserError(f"hydra/sweeper/sampler={name}: MOTPESampler was removed from Optuna (deprecated "
                    f"since 2.9); TPESampler handles several objectives: use hydra/sweeper/sampler=tpe "
                    f"(or nsgaii)")


def trial_seed(seed: int, trial: int) -> int:
    """The sampler's seed before it asks trial `trial` of a study seeded `seed`: a hash, so that
    different seeds give unrelated sequences (seed + trial made seed 124's trials 0-6 those of
    seed 123's 1-7) and every trial, whichever worker asks it, has a stream of its own."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{trial}".encode()).digest()[:4], "little")


def grid_values(name: str, dist) -> list:
    """A grid sampler's values for one param: its choices, or every point of a stepped range."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if dist.step is None or dist.log:
        raise UserError(f"sampler=grid needs choice(...) or range(...) params; {name} is an interval")
    count = round((dist.high - dist.low) / dist.step) + 1
    return [dist.low + i * dist.step for i in range(count)]


def suggest(trial: optuna.Trial, name: str, dist) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def app_command(task_function) -> list[str]:
    """How to start the Hydra app that runs `task_function` again, from the app itself, never
    from sys.argv (under pytest or a driver script that is not the app): `python -m <module>`,
    `python <script>`, or an import of the module and a call of its @hydra.main function."""
    module = sys.modules.get(task_function.__module__)
    if task_function.__module__ == "__main__":
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.name:
            return [sys.executable, "-m", spec.name.removesuffix(".__main__")]
        return [sys.executable, os.path.abspath(module.__file__)]
    entry = f"import {task_function.__module__} as app; app.{task_function.__name__}()"
    return [sys.executable, "-c", entry]


def _lost(trial: optuna.trial.FrozenTrial) -> bool:
    """FAIL because its worker died or was stopped: neither counted in n_trials nor a failure."""
    return trial.state is State.FAIL and bool(trial.user_attrs.get(LOST))


def _silence(trial: optuna.trial.FrozenTrial) -> float:
    """Seconds since the trial's last heartbeat (or its start, before the first one)."""
    last = trial.user_attrs.get(HEARTBEAT) or trial.datetime_start.timestamp()
    return time.time() - last


class Heartbeat:
    """Stamps the running trials' HEARTBEAT attr every `interval` seconds while their jobs run,
    so that other workers can tell a live trial from one whose worker died. A user attr works
    the same on every storage (RDB and journal); workers' clocks must agree to well within the
    grace period (NTP)."""

    def __init__(self, storage, trial_ids: list[int], interval: int):
        self.stopped = threading.Event()

        def run():
            while True:
                try:
                    for trial_id in trial_ids:
                        storage.set_trial_user_attr(trial_id, HEARTBEAT, time.time())
                except Exception as exc:  # told (FAIL) by another worker, or the storage hiccuped
                    log.warning("heartbeat not recorded: %s", exc)
                if self.stopped.wait(interval):
                    return

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


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
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        self.local = isinstance(self.launcher, BasicLauncher)

    def sweep(self, arguments: list[str]) -> None:
        with exit_on_user_error():
            self._sweep(arguments)

    # -- the loop ---------------------------------------------------------------------------

    def _sweep(self, arguments: list[str]) -> None:
        self._check()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        fixed, space = self._search_space(arguments)
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
            shown["hydra"]["sweeper"]["storage"] = self._shown_url()  # no password on disk
        rundir.write_text(self.sweep_dir / "multirun.yaml", OmegaConf.to_yaml(shown))
        self.storage_obj = make_storage(self.url)
        with self._lock():  # the first workers of a new study all want to create it
            study = optuna.create_study(study_name=self.study_name, storage=self.storage_obj,
                                        pruner=make_pruner(self.pruner_cfg),
                                        directions=self.directions, load_if_exists=True)
        if study.directions != [optuna.study.StudyDirection[d.upper()] for d in self.directions]:
            raise UserError(f"study {self.study_name} in {self._shown_url()} has directions "
                            f"{[d.name.lower() for d in study.directions]}, not {self.directions}")
        self._sampler(space, 0)  # a bad sampler config fails before any trial
        done = len(study.trials)
        log.info("study %s in %s: %d trials so far, %d to go", self.study_name, self._shown_url(),
                 done, max(0, self.n_trials - done))
        workers = self._spawn_workers()
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
            left = self.n_trials - sum(not _lost(t) for t in every)  # a lost trial is asked again
            if stop or self.exhausted or left <= 0:
                trials = []
            else:
                study.sampler = self._sampler(space, len(every))
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
        heartbeat = Heartbeat(self.storage_obj, [t._trial_id for t in trials], self.heartbeat_interval)
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
        told = self.storage_obj.get_trial(trial._trial_id)
        if told.state.is_finished():  # marked FAIL by a worker that missed our heartbeats
            log.warning("trial %d was marked %s by another worker while it ran (%s); its run dir "
                        "%s keeps what it wrote", trial.number, told.state.name,
                        told.user_attrs.get("error"), run_dir)
            return
        if run_dir:
            trial.set_user_attr("run_dir", str(run_dir))
        if ret.status is not JobStatus.COMPLETED:
            exc = ret._return_value  # ret.return_value would re-raise it
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
        log.info("trial %d: %s = %s", trial.number, ", ".join(self._objective_names()),
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

    def _search_space(self, arguments: list[str]) -> tuple[list[str], dict]:
        """Fixed overrides and {name: distribution}: `params` first, the command line wins."""
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        by_key = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(lines)}
        fixed, space = [], {}
        for key, override in by_key.items():
            dist = distribution(override)
            if dist is None:
                fixed.append(f"{key}={override.get_value_element_as_str()}")
            else:
                space[key] = dist
        if not space:
            log.info("no search space (hydra.sweeper.params): n_trials=%d runs of the fixed config",
                     self.n_trials)
        return fixed, space

    def _sampler(self, space: dict, existing: int):
        """The configured sampler, seeded for the trial it is about to ask (trial_seed): a
        resumed study does not replay its parameters, and workers sharing a study never draw
        from the same random stream."""
        kwargs = {}
        seed = self.sampler_cfg.get("seed")
        if seed is not None:
            kwargs["seed"] = trial_seed(seed, existing)
        if self.sampler_cfg._target_.endswith("GridSampler") and not self.sampler_cfg.get("search_space"):
            kwargs["search_space"] = {k: grid_values(k, d) for k, d in space.items()}
        for cls, (package, extra) in _SAMPLER_PACKAGES.items():  # optuna imports them at the first ask
            if self.sampler_cfg._target_.endswith(cls) and importlib.util.find_spec(package) is None:
                raise UserError(f"hydra/sweeper/sampler: {cls} needs the {package} package: "
                                f"pip install \"spectraqlora[{extra}]\"")
        try:
            return instantiate(self.sampler_cfg, **kwargs)
        except InstantiationException as exc:
            if isinstance(exc.__cause__, UserError):  # sampler=motpe
                raise exc.__cause__ from None
            raise UserError(f"hydra/sweeper/sampler: {str(exc).splitlines()[0]}") from None

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        """FAIL the trials left RUNNING by a dead worker (call under the study lock): those of
        a dead process on this machine at once, others once their heartbeat is older than the
        grace period."""
        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
            pid = t.user_attrs.get("worker_pid")
            if t.user_attrs.get("worker_host") == host and pid and not _alive(pid):
                error = f"its sweep worker (pid {pid}) died"
            elif _silence(t) > self.grace_period:
                error = (f"no heartbeat for {_silence(t):.0f} s (grace period {self.grace_period} s): "
                         f"its sweep worker ({t.user_attrs.get('worker_host')}, pid {pid}) died")
            else:
                continue
            self.storage_obj.set_trial_user_attr(t._trial_id, "error", error)
            self.storage_obj.set_trial_user_attr(t._trial_id, LOST, True)
            self._tell(study, t.number, state=State.FAIL)
            log.warning("trial %d FAIL: %s", t.number, error)

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

    def _spawn_workers(self) -> list[subprocess.Popen]:
        """workers > 1: that many - 1 more processes of this Hydra app on this machine, sharing
        the study; each asks for its next trial when free (no batch waits for its slowest)."""
        if self.workers <= 1:
            return []
        hydra_cfg = self.config.hydra
        cmd = [*app_command(self.task_function), "-m", f"--config-name={hydra_cfg.job.config_name}",
               *hydra_cfg.overrides.hydra, *hydra_cfg.overrides.task, "hydra.sweeper.workers=1",
               f"hydra.sweeper.storage={self.url}", f"hydra.sweeper.study_name={self.study_name}",
               f"hydra.sweep.dir={self.sweep_dir.resolve()}",
               # Hydra's callbacks (on_multirun_start/end: reports) run once, in this process
               *(f"~hydra.callbacks.{name}" for name in hydra_cfg.callbacks or {})]
        log.info("starting %d more sweep workers", self.workers - 1)
        gpus = self._gpus()
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]  # this process: before CUDA starts
        return [subprocess.Popen(cmd, env={**os.environ, WORKER_ENV: "1", **(
                    {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {})})
                for i in range(1, self.workers)]

    @staticmethod
    def _gpus() -> list[str]:
        """GPU ids to spread workers over: several GPUs and no CUDA_VISIBLE_DEVICES given."""
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            return []
        import torch

        count = torch.cuda.device_count()
        return [str(i) for i in range(count)] if count > 1 else []

    def _failure_stop(self, study: optuna.Study) -> str | None:
        """The error that stops the sweep once too many trials failed, else None."""
        failed = [t for t in study.get_trials(deepcopy=False, states=(State.FAIL,)) if not _lost(t)]
        if len(failed) <= self.max_failure_rate * self.n_trials:
            return None
        return (f"sweep stopped: {len(failed)} trials failed, more than hydra.sweeper."
                f"max_failure_rate={self.max_failure_rate} of n_trials={self.n_trials}; last "
                f"error (trial {failed[-1].number}): {failed[-1].user_attrs.get('error')}")

    # -- results ----------------------------------------------------------------------------

    def _objective_names(self) -> list[str]:
        if self.objectives:
            return self.objectives
        return ["objective"] if len(self.directions) == 1 else [
            f"objective_{i}" for i in range(len(self.directions))]

    def _shown_url(self) -> str:
        """The storage URL without its password (results files and logs never hold secrets)."""
        if self.url.startswith("journal://"):
            return self.url
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def _write_results(self, study: optuna.Study, final: bool = False) -> None:
        trials = study.get_trials(deepcopy=False)
        results = {
            "name": "optuna",  # hydra-optuna-sweeper's fields first: name, best_params, best_value
            "sweeper": "spectraqlora_optuna",
            "study_name": self.study_name,
            "storage": self._shown_url(),
            "directions": self.directions,
            "objectives": self._objective_names(),
            "trials": dict(Counter(t.state.name for t in trials)),
        }
        complete = [t for t in trials if t.state is State.COMPLETE]
        if complete and len(self.directions) == 1:
            best = study.best_trial
            results.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                           best_run_dir=best.user_attrs.get("run_dir"))
        elif complete:
            results["solutions"] = [{"params": t.params, "values": list(t.values)}
                                    for t in sorted(study.best_trials, key=lambda t: t.number)]
            results["pareto_front"] = [
                {"trial": t.number, "values": dict(zip(self._objective_names(), t.values)),
                 "params": t.params, "run_dir": t.user_attrs.get("run_dir")}
                for t in sorted(study.best_trials, key=lambda t: t.number)]
        rundir.write_text(self.sweep_dir / RESULTS, OmegaConf.to_yaml(OmegaConf.create(results)))
        table = study.trials_dataframe()
        rundir.write_text(self.sweep_dir / "trials.csv", table.to_csv(index=False))
        plots = []
        if final or time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
            plots = self._plots(study, len(complete))
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

    def _plots(self, study: optuna.Study, complete: int) -> list[Path]:
        return plot_study(study, self._objective_names(), complete, self.sweep_dir)


# Fewer finished trials than this: parameter importances are noise, and the plot says so.
RELIABLE_IMPORTANCES = 10


def plot_study(study: optuna.Study, names: list[str], complete: int, out: Path) -> list[Path]:
    """optuna.visualization.matplotlib figures as PNGs in `out`, drawn in a style context of
    their own (optuna sets ggplot globally, which leaked into later trials' heatmaps)."""
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
    written = []
    for name, plot in wanted.items():
        try:
            with plt.style.context("default"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot()
                ax = axes if hasattr(axes, "figure") else axes.flat[0]
                if name == "optimization_history.png":
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
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
