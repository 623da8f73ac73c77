"""`python -m spectraqlora.train [overrides]`: scan, select, quantize, adapt, train, evaluate.

The command line becomes a recipe.Plan; the main process prepares it, one broadcast shares it,
every rank executes it (run/recipe.py). Returns the final eval loss, so that any Hydra sweeper can
minimize it (spectraqlora's sweeper reads it from the run's metrics.json instead: docs/sweeps.md).
Under `accelerate launch` or `torchrun`, the main process composes the config and the other
ranks follow its plan (run/distributed.py).
"""
from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from spectraqlora import cli
from spectraqlora.config import CONF_DIR, to_train_config
from spectraqlora.errors import Interrupted, UserError, exit_on_user_error
from spectraqlora.run import recipe
from spectraqlora.run.distributed import Launch, MainProcessFailed
from spectraqlora.run.telemetry import RunInfo
from spectraqlora.store import rundir
from spectraqlora.sweep.study import current_trial, study_name

log = logging.getLogger("spectraqlora.train")


def main() -> None:
    """The entrypoint: Hydra on the main process; under accelerate launch or torchrun, the other
    ranks take their plan from it instead."""
    launch = Launch.from_env()
    if launch.launched:
        with exit_on_user_error():
            launch.check_not_a_sweep(sys.argv[1:])
        launch.start()
        if not launch.is_main:
            try:
                recipe.execute(launch.share(), launch)
            except MainProcessFailed:  # the main process has said why
                sys.exit(1)
            return
    cli.run(hydra_main, "train")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    hydra_cfg, launch = HydraConfig.get(), Launch.from_env()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    single = hydra_cfg.mode is not RunMode.MULTIRUN and not launch.launched
    with one_line_errors(hydra_cfg, run_dir, launch, single):
        plan = launch.share(lambda: recipe.prepare(job(cfg, hydra_cfg, run_dir, single)))
        return recipe.execute(plan, launch)["eval_loss"]


@contextlib.contextmanager
def one_line_errors(hydra_cfg, run_dir: Path, launch: Launch, single: bool):
    """The one guard around a run: a UserError (bad input, out of memory, a non-finite loss, a
    signal) becomes one line on the terminal and an ERROR line in the run's log; a signal's line
    says how to resume; a run refused before training leaves no run dir. In a multirun the error
    goes on to Hydra, which records the job as failed and runs the next one."""
    multirun = hydra_cfg.mode is RunMode.MULTIRUN
    if single:
        signal.signal(signal.SIGTERM, _raise_interrupt)  # as Ctrl-C, until training handles it
    with exit_on_user_error(reraise=multirun):
        try:
            yield
        except KeyboardInterrupt as exc:
            if not single:
                raise
            signum = exc.args[0] if exc.args else signal.SIGINT
            error = Interrupted(f"stopped by {signal.Signals(signum).name}", signum)
            _record_refusal(error, hydra_cfg, run_dir, launch, multirun)
            raise error from None
        except UserError as exc:
            _record_refusal(exc, hydra_cfg, run_dir, launch, multirun)
            raise


def _record_refusal(exc: UserError, hydra_cfg, run_dir: Path, launch: Launch, multirun: bool) -> None:
    """A signal's line gets how to resume; the line goes into the run's log; a single run refused
    before training leaves no run dir."""
    if isinstance(exc, Interrupted):
        last = rundir.last_checkpoint(run_dir)
        exc.args = (f"{exc}; " + (f"kept {last}; resume with: {resume_command(hydra_cfg, run_dir)}"
                                  if last else "no checkpoint to resume from"),)
    to_log_file(f"error: {exc}")  # the terminal gets it from exit_on_user_error
    if not multirun and launch.is_main:
        rundir.discard_if_untrained(run_dir)  # refused before training: no empty run dir


def say_model_preset(hydra_cfg, cfg) -> None:
    """A model config may pick its trainer preset (model=minilm: trainer=small, a higher learning
    rate): said in one line when it does and the command line named no trainer."""
    chosen = hydra_cfg.runtime.choices.get("trainer")
    typed = any(o.split("=")[0].lstrip("+~") == "trainer" for o in hydra_cfg.overrides.task)
    if chosen not in (None, "default") and not typed:
        log.info("trainer=%s: the preset model=%s picks (learning_rate=%g); trainer=default for the "
                 "defaults", chosen, hydra_cfg.runtime.choices.get("model"), cfg.trainer.learning_rate)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def resume_command(hydra_cfg, run_dir: Path) -> str:
    """The command line that continues this run: its overrides, its run dir, trainer.resume."""
    own = ("hydra.run.dir", "trainer.resume")
    kept = [o for o in hydra_cfg.overrides.task if o.split("=")[0].lstrip("+~") not in own]
    return shlex.join(["python", "-m", "spectraqlora.train", *kept, f"hydra.run.dir={run_dir}",
                       "trainer.resume=true"])


def to_log_file(message: str) -> None:
    """An ERROR line in the run's log file (Hydra's file handler) but not on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def job(cfg: DictConfig, hydra_cfg, run_dir: Path, single: bool) -> recipe.Plan:
    """The run the command line asks for: the typed config; W&B naming (the overrides as the
    name; in a sweep, the study or sweep dir as group); in a sweep by spectraqlora's sweeper,
    the Optuna trial to report to; signals stop single runs with a checkpoint."""
    name = ",".join(o for o in hydra_cfg.overrides.task if not o.startswith("hydra.")) or "default"
    if hydra_cfg.runtime.choices.get("hparams_search") and hydra_cfg.mode is not RunMode.MULTIRUN:
        raise UserError(f"hparams_search={hydra_cfg.runtime.choices['hparams_search']} configures a sweep, "
                        f"which runs with -m: python -m spectraqlora.train -m {shlex.join(hydra_cfg.overrides.task)}")
    train_cfg = to_train_config(cfg)
    say_model_preset(hydra_cfg, train_cfg)
    record = {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
              "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task)}  # as Hydra writes .hydra/
    if hydra_cfg.mode is not RunMode.MULTIRUN:
        return recipe.Plan(train_cfg, run_dir, RunInfo(name=name), stop_on_signal=single, record=record)
    info = RunInfo(name=name, group=study_name(hydra_cfg.sweeper, hydra_cfg.sweep.dir), job_type="sweep-trial")
    return recipe.Plan(train_cfg, run_dir, info, trial=current_trial(hydra_cfg), record=record)


if __name__ == "__main__":
    main()
