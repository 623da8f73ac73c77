"""One training run, top to bottom. The main process plans it (claims the run dir, finds where
to resume, loads the inputs, scans and selects) and hands the plan to every rank in one
broadcast; each rank then builds the model on that selection and trains; the main process
evaluates into the run dir and records it. `python -m spectraqlora.train` (train.py) reads the
command line into a Plan and calls `train`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from spectraqlora import checkpoint, exports, metrics, rundir, telemetry
from spectraqlora.config import RankAllocation, Strategy, TrainConfig
from spectraqlora.distributed import SINGLE, Launch
from spectraqlora.errors import Interrupted, NonFiniteLoss, OutOfMemory, UserError
from spectraqlora.selection import Selection, check_layers, check_ranks_fit, selection_record, snr_ranks
from spectraqlora.telemetry import RunInfo

log = logging.getLogger("spectraqlora.train")


@dataclass
class Plan:
    """A run as the main process decides it, the same on every rank. The entrypoint fills the
    first five fields; `plan` the rest."""

    cfg: TrainConfig
    run_dir: Path
    info: RunInfo = field(default_factory=RunInfo)  # W&B naming
    trial: Any = None  # the Optuna trial to report eval losses to (spectraqlora's sweeper)
    stop_on_signal: bool = False  # SIGINT/SIGTERM save a checkpoint and stop (single runs)
    record: dict[str, str] | None = None  # the run's record (.hydra/ files), written when it starts afresh
    resume_from: Path | None = None
    finished: dict | None = None  # the metrics of a run that had finished already
    selection: Selection | None = None


def train(job: Plan | Callable[[], Plan] | None, launch: Launch = SINGLE) -> dict:
    """Run `job` (on the other ranks of a launch: None, they get the main process's plan) and
    return its metrics. Out of memory becomes an OutOfMemory error that names the configuration,
    after the memory is given back, so that the next trial of a sweep in this process starts
    clean."""
    metrics.reset_peak_memory()  # this run's peak, not that of earlier jobs in this process
    kept: dict = {}

    def decide() -> Plan:
        kept["plan"] = planned = job() if callable(job) else job
        kept["inputs"] = plan(planned)
        return planned

    try:
        kept["plan"] = launch.share(decide if launch.is_main else None)
        return kept["plan"].finished or execute(kept["plan"], launch, kept.get("inputs"))
    except UserError:
        raise
    except Exception as exc:
        from spectraqlora.training import is_out_of_memory, release_accelerator_memory

        if not is_out_of_memory(exc):
            raise
        cause = str(exc).splitlines()[0]
    finally:
        if "plan" in kept:
            rundir.release(kept["plan"].run_dir)  # a no-op where this process holds no claim
    release_accelerator_memory()  # the failed run's frames are gone by now
    raise OutOfMemory(f"out of memory ({cause}) with {_describe(kept['plan'].cfg)}: lower the batch size "
                      f"(raise trainer.gradient_accumulation_steps to keep the effective batch), set "
                      f"trainer.gradient_checkpointing=true, or lower selection.top_frac or lora.r")


def _describe(cfg: TrainConfig) -> str:
    return (f"model={cfg.model.name_or_path}, selection={cfg.selection.strategy.value} top_frac="
            f"{cfg.selection.top_frac}, lora.r={cfg.lora.r}, quant={cfg.quant.mode.value}, "
            f"trainer.per_device_train_batch_size={cfg.trainer.per_device_train_batch_size}, "
            f"dataset.max_length={cfg.dataset.max_length}")


def plan(job: Plan):
    """The main process's part before training, filled into `job`: the run dir claimed (this
    process's until the run ends), the checkpoint to resume from, or the metrics of a run that
    has finished already; else the inputs (returned, kept by the main process) and the
    selection."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    rundir.claim(job.run_dir)
    job.resume_from = rundir.resume_point(job.run_dir, job.cfg.trainer.resume)
    continued = job.resume_from is not None or (job.run_dir / rundir.METRICS).exists()
    if continued:
        check_resumed_config(job)
    elif job.record:
        if job.cfg.trainer.resume:
            log.info("trainer.resume=true, but %s holds no checkpoint: training starts from step 0 "
                     "(a mistyped hydra.run.dir?)", job.run_dir)
        rundir.write_record(job.run_dir, job.record)
    rundir.open_log(job.run_dir)
    if (job.run_dir / rundir.METRICS).exists():
        log.info("%s has finished already: nothing to resume", job.run_dir)
        job.finished = rundir.read_json(job.run_dir / rundir.METRICS)
        return None
    from spectraqlora import build  # torch: not imported before the config is checked

    telemetry.configure_progress(telemetry.show_progress(job.cfg.logger))
    inputs = build.load_inputs(job.cfg)
    job.selection = choose(job.cfg, inputs.path, inputs.files, job.run_dir)
    return inputs


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
    from spectraqlora.scanner import scan_and_select

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
    heatmap = exports.write_snr(run_dir, table, chosen, exports.slug(cfg.model.name_or_path))
    return Selection(table, chosen, ranks, heatmap)


def execute(job: Plan, launch: Launch, inputs=None) -> dict:
    """Every rank: build the model on the plan's selection, train, evaluate; the main process
    records the run (metrics.json last: it marks the run finished)."""
    from transformers import set_seed

    from spectraqlora import build, training

    began, cfg, selection = time.perf_counter(), job.cfg, job.selection
    telemetry.configure_progress(telemetry.show_progress(cfg.logger))  # the other ranks' bars too
    with launch.main_first():  # the main process has its inputs from planning; the others load theirs
        inputs = inputs or build.load_inputs(cfg)
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
                 "selection/num_modules": len(selection.chosen), "selection/top_frac": cfg.selection.top_frac,
                 "lora/r": cfg.lora.r}, step=0)
        meter, stopper = training.TelemetryCallback(tel, cfg.model.task), training.StopOnSignal()
        callbacks = [meter, stopper] + ([_pruning(job.trial)] if job.trial else [])
        trainer = training.build_trainer(net, tokenized, inputs.tokenizer, cfg, job.run_dir, callbacks,
                                         choices, launch.fsdp)
        before, after, runtime = fit(trainer, job, stopper)
        training.save_adapter(trainer, job.run_dir / rundir.ADAPTER)
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


def _pruning(trial):
    from spectraqlora.sweep import pruning_callback

    return pruning_callback(trial)


def fit(trainer, job: Plan, stopper) -> tuple[dict, dict, float]:
    """Evaluate (when trainer.eval_before), train (from the plan's checkpoint when resuming),
    evaluate: the metrics before and after, and the training time. A signal stops training
    with a checkpoint (Interrupted); a non-finite eval loss stops the run (NonFiniteLoss)."""
    from spectraqlora import training

    before = training.evaluate(trainer, job.cfg.model.task) if job.cfg.trainer.eval_before else {}
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
    after = training.evaluate(trainer, job.cfg.model.task)
    log.info("after training:  %s", metrics.format_metrics(after))
    if not math.isfinite(after["eval_loss"]):
        raise NonFiniteLoss(f"the eval loss is {after['eval_loss']} after training; lower trainer.learning_rate")
    return before, after, runtime


def record(job: Plan, inputs, targets: list[str], trainable: int, result: dict, tel) -> None:
    """selection.json (with the base checkpoint's identity, which export checks), the W&B
    summary, and metrics.json last: it marks the run finished."""
    from spectraqlora import data
    from spectraqlora.scan_cache import identity

    selection = job.selection
    rundir.write_json(job.run_dir / rundir.SELECTION, selection_record(
        job.cfg.selection, selection.chosen, lora_targets=targets, trainable_params=trainable,
        **({"ranks": selection.ranks} if selection.ranks else {}),
        base={"path": str(inputs.path), "identity": identity(inputs.files)}, data=data.identity(inputs.raw)))
    tel.summary(result)
    rundir.write_json(job.run_dir / rundir.METRICS, result)
