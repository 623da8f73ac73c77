"""One training run, top to bottom, in two phases. `prepare` (the main process): claim the run
dir, find where to resume, load the inputs, scan and select, all into the Plan. One broadcast
hands the plan to every rank (distributed.Launch.share). `execute` (every rank): build the model
on that selection, train, evaluate; the main process records the run into its dir.
`python -m spectraqlora.train` (train.py) reads the command line into a Plan and runs both.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectraqlora.config import RankAllocation, Strategy, TrainConfig, show_progress
from spectraqlora.errors import Interrupted, NonFiniteLoss, OutOfMemory, UserError
from spectraqlora.run import metrics, telemetry
from spectraqlora.run.distributed import SINGLE, Launch
from spectraqlora.run.telemetry import RunInfo
from spectraqlora.spectrum import artifacts
from spectraqlora.spectrum.selection import Selection, check_layers, check_ranks_fit, selection_record, snr_ranks
from spectraqlora.store import checkpoint, rundir

log = logging.getLogger("spectraqlora.train")


@dataclass
class Plan:
    """A run as the main process decides it, the same on every rank. The entrypoint fills the
    first five fields; `prepare` the rest."""

    cfg: TrainConfig
    run_dir: Path
    info: RunInfo = field(default_factory=RunInfo)  # W&B naming
    trial: Any = None  # the Optuna trial to report eval losses to (spectraqlora's sweeper)
    stop_on_signal: bool = False  # SIGINT/SIGTERM save a checkpoint and stop (single runs)
    record: dict[str, str] | None = None  # the run's record (.hydra/ files), written when it starts afresh
    resume_from: Path | None = None
    finished: dict | None = None  # the metrics of a run that had finished already
    selection: Selection | None = None
    inputs: Any = None  # the main process's loaded checkpoint, tokenizer and rows: not broadcast

    def __getstate__(self) -> dict:
        """What the broadcast sends: everything but the inputs (every other rank loads its own)."""
        return {**self.__dict__, "inputs": None}


def run(plan: Plan, launch: Launch = SINGLE) -> dict:
    """A run in one process (tests, scripts): both phases back to back. The entrypoint runs them
    itself, the plan inside the launch's one broadcast (train.py)."""
    return execute(prepare(plan), launch)


def _describe(cfg: TrainConfig) -> str:
    top_frac = f" top_frac={cfg.selection.top_frac}" if hasattr(cfg.selection, "top_frac") else ""
    return (f"model={cfg.model.name_or_path}, selection={cfg.selection.strategy.value}{top_frac}, "
            f"lora.r={cfg.lora.r}, quant={cfg.quant.mode.value}, "
            f"trainer.per_device_train_batch_size={cfg.trainer.per_device_train_batch_size}, "
            f"dataset.max_length={cfg.dataset.max_length}")


def prepare(plan: Plan) -> Plan:
    """The main process's phase: the run dir claimed (this process's until the run ends), the
    checkpoint to resume from, or the metrics of a run that has finished already; else the
    inputs loaded and the selection made. Returns the plan, ready to broadcast."""
    metrics.reset_peak_memory()  # this run's peak, not that of earlier jobs in this process
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    rundir.claim(plan.run_dir)
    try:
        _prepare(plan)
    except BaseException:
        rundir.release(plan.run_dir)
        raise
    return plan


def _prepare(plan: Plan) -> None:
    plan.resume_from = rundir.resume_point(plan.run_dir, plan.cfg.trainer.resume)
    continued = plan.resume_from is not None or (plan.run_dir / rundir.METRICS).exists()
    if continued:
        check_resumed_config(plan)
    elif plan.record:
        if plan.cfg.trainer.resume:
            log.info("trainer.resume=true, but %s holds no checkpoint: training starts from step 0 "
                     "(a mistyped hydra.run.dir?)", plan.run_dir)
        rundir.write_record(plan.run_dir, plan.record)
    rundir.open_log(plan.run_dir)
    if (plan.run_dir / rundir.METRICS).exists():
        log.info("%s has finished already: nothing to resume", plan.run_dir)
        plan.finished = rundir.read_json(plan.run_dir / rundir.METRICS)
        return
    from spectraqlora.run import build  # torch: not imported before the config is checked

    telemetry.configure_progress(show_progress(plan.cfg.logger))
    plan.inputs = build.load_inputs(plan.cfg)
    plan.selection = choose(plan.cfg, plan.inputs.path, plan.inputs.files, plan.run_dir)


def check_resumed_config(job: Plan) -> None:
    """A resumed (or finished) run continues what its record says it trains: a typed config that
    changes the model, the data or the schedule is refused, naming each key with both values."""
    from omegaconf import OmegaConf

    from spectraqlora.config import resume_differences, to_train_config

    record = job.run_dir / rundir.RECORD / "config.yaml"
    if not record.is_file():
        return  # a run made outside Hydra (tests, scripts): nothing to check against
    if differences := resume_differences(to_train_config(OmegaConf.load(record)), job.cfg):
        raise UserError(f"{job.run_dir} was trained with another config than this command gives: "
                        f"{'; '.join(differences)}; resume with the run's own values, or choose another "
                        f"hydra.run.dir for a new run")


def choose(cfg: TrainConfig, path: Path, files: list[Path], run_dir: Path) -> Selection:
    """Scan (or read the cache) and select; snr.json and the heatmap into the run dir."""
    from spectraqlora.spectrum.scanner import scan_and_select

    if cfg.selection.strategy is Strategy.layers and (n := checkpoint.num_layers(path)):
        check_layers(cfg.selection.layers, cfg.selection.last_k, n)
    table, chosen = scan_and_select(files, cfg)
    log.info("selected %d of %d modules (%s):\n%s", len(chosen), len(table),
             cfg.selection.strategy.value, Selection(table, chosen).describe())
    ranks = None
    if cfg.lora.rank_allocation is RankAllocation.snr:
        ranks = snr_ranks(table, chosen, cfg.lora.r, cfg.lora.r_min, cfg.lora.r_max)
        log.info("ranks by SNR: %s", ", ".join(f"{n}={r}" for n, r in ranks.items()))
    check_ranks_fit(table, chosen, cfg.lora.r, ranks)
    heatmap = artifacts.write_snr(run_dir, table, chosen, artifacts.slug(cfg.model.name_or_path))
    return Selection(table, chosen, ranks, heatmap)


def execute(plan: Plan, launch: Launch = SINGLE) -> dict:
    """Every rank's phase: build the model on the plan's selection, train, evaluate; the main
    process records the run (metrics.json last: it marks the run finished) and releases its dir.
    Returns the run's metrics. Out of memory becomes an OutOfMemory error that names the
    configuration, after the memory is given back, so that the next trial of a sweep in this
    process starts clean."""
    from spectraqlora.run.loop import is_out_of_memory, release_accelerator_memory

    if plan.finished:
        rundir.release(plan.run_dir)
        return plan.finished
    if not launch.is_main:
        metrics.reset_peak_memory()
    try:
        return _execute(plan, launch)
    except UserError:
        raise
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        cause = str(exc).splitlines()[0]
    finally:
        rundir.release(plan.run_dir)  # a no-op where this process holds no claim
    release_accelerator_memory()  # the failed run's frames are gone by now
    raise OutOfMemory(f"out of memory ({cause}) with {_describe(plan.cfg)}: lower the batch size "
                      f"(raise trainer.gradient_accumulation_steps to keep the effective batch), set "
                      f"trainer.gradient_checkpointing=true, or lower selection.top_frac or lora.r")


def _execute(job: Plan, launch: Launch) -> dict:
    from transformers import set_seed

    from spectraqlora.run import build, loop

    began, cfg, selection = time.perf_counter(), job.cfg, job.selection
    telemetry.configure_progress(show_progress(cfg.logger))  # the other ranks' bars too
    with launch.main_first():  # the main process has its inputs from planning; the others load theirs
        inputs = job.inputs or build.load_inputs(cfg)
    if launch.launched:
        log.info("rank %d of %d trains %d modules: %s", launch.rank, launch.world_size,
                 len(selection.chosen), selection.digest())
    tokenized, choices = inputs.tokenized(cfg)
    set_seed(cfg.seed)
    net, targets = build.new_model(inputs, cfg, selection, launch.fsdp)
    trainable, total = net.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s", f"{trainable:,}", f"{total:,}")

    with telemetry.session(cfg, job.run_dir, job.info, launch.is_main) as tel:
        tel.selection(selection.table, selection.chosen, selection.heatmap)
        tel.log({"params/trainable": trainable, "params/trainable_frac": trainable / total,
                 "selection/num_modules": len(selection.chosen), "lora/r": cfg.lora.r}
                | ({"selection/top_frac": cfg.selection.top_frac} if hasattr(cfg.selection, "top_frac") else {}),
                step=0)
        meter, stopper = loop.TelemetryCallback(tel, cfg.model.task), loop.StopOnSignal()
        callbacks = [meter, stopper] + ([loop.PruningCallback(job.trial)] if job.trial else [])
        trainer = loop.build_trainer(net, tokenized, inputs.tokenizer, cfg, job.run_dir, callbacks,
                                         choices, launch.fsdp)
        before, after, runtime = fit(trainer, job, stopper)
        loop.save_adapter(trainer, job.run_dir / rundir.ADAPTER)
        result = metrics.final(after, before, trainable_params=trainable, trainable_frac=trainable / total,
                               selected_modules=len(selection.chosen), lora_r=cfg.lora.r,
                               train_runtime_s=runtime, train_steps=trainer.state.global_step,
                               skipped_steps=trainer.skipped_steps, **meter.totals(trainer.args, trainer.state))
        if launch.is_main:
            record(job, inputs, targets, trainable, result, tel)
    if launch.is_main:
        rundir.finish(job.run_dir, cfg.trainer.keep_checkpoints)
        log.info("run finished\n%s", metrics.format_summary(result, job.run_dir, job.run_dir / rundir.ADAPTER,
                                                            time.perf_counter() - began, tel.location))
    return result


def fit(trainer, job: Plan, stopper) -> tuple[dict, dict, float]:
    """Evaluate (when trainer.eval_before), train (from the plan's checkpoint when resuming),
    evaluate: the metrics before and after, and the training time. A signal stops training
    with a checkpoint (Interrupted); a non-finite eval loss stops the run (NonFiniteLoss)."""
    from spectraqlora.run import loop

    before = loop.evaluate(trainer, job.cfg.model.task) if job.cfg.trainer.eval_before else {}
    if before:
        log.info("before training: %s", metrics.format_metrics(before))
    if job.resume_from:
        log.info("resuming from %s", job.resume_from)
    start = time.perf_counter()
    with stopper if job.stop_on_signal else contextlib.nullcontext():
        trainer.train(resume_from_checkpoint=str(job.resume_from) if job.resume_from else None)
    runtime = time.perf_counter() - start
    if stopper.signum:
        raise Interrupted(f"stopped by {signal.Signals(stopper.signum).name} at step "
                          f"{trainer.state.global_step} of {trainer.state.max_steps}", stopper.signum)
    after = loop.evaluate(trainer, job.cfg.model.task)
    log.info("after training:  %s", metrics.format_metrics(after))
    if not math.isfinite(after["eval_loss"]):
        raise NonFiniteLoss(f"the eval loss is {after['eval_loss']} after training; lower trainer.learning_rate")
    return before, after, runtime


def record(job: Plan, inputs, targets: list[str], trainable: int, result: dict, tel) -> None:
    """selection.json (with the base checkpoint's identity, which export checks), the W&B
    summary, and metrics.json last: it marks the run finished."""
    from spectraqlora.data import dataset
    from spectraqlora.spectrum.cache import identity

    selection = job.selection
    rundir.write_json(job.run_dir / rundir.SELECTION, selection_record(
        job.cfg.selection, selection.chosen, lora_targets=targets, trainable_params=trainable,
        **({"ranks": selection.ranks} if selection.ranks else {}),
        base={"path": str(inputs.path), "identity": identity(inputs.files)}, data=dataset.identity(inputs.raw)))
    tel.summary(result)
    rundir.write_json(job.run_dir / rundir.METRICS, result)
