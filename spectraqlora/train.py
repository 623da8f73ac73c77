"""`python -m spectraqlora.train [overrides]`: scan, select, quantize, adapt, train, evaluate.

Returns the final eval loss so any Hydra sweeper can minimize it. Under `accelerate launch` or
`torchrun`, the main process does all of that and the other ranks follow it (distributed.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from spectraqlora import checkpoint, distributed, exports, rundir, telemetry
from spectraqlora.config import CONF_DIR, RankAllocation, Strategy, TrainConfig, to_train_config
from spectraqlora.errors import Interrupted, NonFiniteLoss, OutOfMemory, UserError, exit_on_user_error
from spectraqlora.selection import check_layers, check_ranks_fit, selection_record, snr_ranks
from spectraqlora.sweep import current_trial, study_name
from spectraqlora.telemetry import RunInfo

log = logging.getLogger("spectraqlora.train")


def run(cfg: TrainConfig, run_dir: Path, info: RunInfo | None = None) -> dict:
    """The whole path for one configuration; writes the run dir and returns its metrics.

    Out of memory becomes an OutOfMemory error that names the configuration, after the memory
    is given back, so that the next trial of a sweep in this process starts clean.
    """
    try:
        resume_from, finished = distributed.from_main(lambda: _start(run_dir, cfg.trainer.resume))
        if finished:
            return finished
        return _run(cfg, run_dir, resume_from, info or RunInfo())
    except UserError:
        raise
    except Exception as exc:
        from spectraqlora.training import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        cause = str(exc).splitlines()[0]
    finally:
        rundir.release(run_dir)
    from spectraqlora.training import release_accelerator_memory

    release_accelerator_memory()  # the failed run's frames are gone by now
    raise OutOfMemory(
        f"out of memory ({cause}) with model={cfg.model.name_or_path}, "
        f"selection={cfg.selection.strategy.value} top_frac={cfg.selection.top_frac}, "
        f"lora.r={cfg.lora.r}, quant={cfg.quant.mode.value}, trainer.per_device_train_batch_size="
        f"{cfg.trainer.per_device_train_batch_size}, dataset.max_length={cfg.dataset.max_length}: "
        f"lower the batch size (raise trainer.gradient_accumulation_steps to keep the effective "
        f"batch), set trainer.gradient_checkpointing=true, or lower selection.top_frac or lora.r")


def _start(run_dir: Path, resume: bool) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from, and the metrics of a run that has finished already; the
    run dir is this process's until the run ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.claim(run_dir)
    resume_from = rundir.resume_point(run_dir, resume)
    if (run_dir / rundir.METRICS).exists():
        log.info("%s has finished already: nothing to resume", run_dir)
        return None, rundir.read_json(run_dir / rundir.METRICS)
    return resume_from, None


def select(cfg: TrainConfig, files: list[Path], run_dir: Path):
    """Scan (or read the cache), select, export snr.json and the heatmap; the SNR table, the
    chosen modules, their ranks (rank_allocation=snr) and the heatmap's path."""
    from spectraqlora.scan import scan_and_select  # torch: not imported before the config is checked

    table, chosen = scan_and_select(files, cfg)
    log.info("selected %d of %d modules (%s):\n%s", len(chosen), len(table),
             cfg.selection.strategy.value, format_selection(table, chosen))
    ranks = None
    if cfg.lora.rank_allocation is RankAllocation.snr:
        ranks = snr_ranks(table, chosen, cfg.lora.r, cfg.lora.r_min, cfg.lora.r_max)
        log.info("ranks by SNR: %s", ", ".join(f"{n}={r}" for n, r in ranks.items()))
    check_ranks_fit(table, chosen, cfg.lora.r, ranks)
    heatmap = exports.write_snr(run_dir, table, chosen, exports.slug(cfg.model.name_or_path))
    return table, chosen, ranks, heatmap


def _run(cfg: TrainConfig, run_dir: Path, resume_from: Path | None, info: RunInfo) -> dict:
    began = time.perf_counter()
    telemetry.reset_peak_memory()  # this run's peak, not that of earlier jobs in this process
    telemetry.configure_progress(telemetry.show_progress(cfg.logger))
    with distributed.main_first():  # downloads (or the random-init build) once per machine
        path = checkpoint.resolve(cfg.model)  # first: a missing model fails before heavy imports
        files = checkpoint.safetensors_files(path)
        if cfg.selection.strategy is Strategy.layers and (n := checkpoint.num_layers(path)):
            check_layers(cfg.selection.layers, cfg.selection.last_k, n)  # before any model loads
        from transformers import set_seed

        from spectraqlora import data, modeling, training

        modeling.check_quant_support(cfg.quant)
        set_seed(cfg.seed)
        tokenizer = modeling.load_tokenizer(path, cfg.model)
        raw = data.load(cfg.dataset, cfg.model.task, cfg.seed)

    table, chosen, ranks, heatmap = distributed.from_main(lambda: select(cfg, files, run_dir))
    if distributed.launched():
        log.info("rank %d of %d trains %d modules: %s", distributed.rank(), distributed.world_size(),
                 len(chosen), selection_digest(chosen))

    tokenized = data.tokenize(raw, tokenizer, cfg.dataset, cfg.model.task)
    base = modeling.load_base(path, cfg.model, cfg.quant, tokenizer,
                              data.num_labels(raw, cfg.dataset, cfg.model.task))
    targets = modeling.model_names(base, chosen)
    target_ranks = {t: ranks[n] for t, n in zip(targets, chosen)} if ranks else None
    net = modeling.add_lora(base, targets, cfg.lora, cfg.model, target_ranks)
    if cfg.trainer.gradient_checkpointing:
        modeling.enable_checkpointing(net)
    trainable, total = net.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s", f"{trainable:,}", f"{total:,}")

    with telemetry.session(cfg, run_dir, info) as tel:
        tel.selection(table, chosen, heatmap)
        tel.log({"params/trainable": trainable, "params/trainable_frac": trainable / total,
                 "selection/num_modules": len(chosen), "selection/top_frac": cfg.selection.top_frac,
                 "lora/r": cfg.lora.r}, step=0)
        meter, stopper = training.TelemetryCallback(tel, cfg.model.task), training.StopOnSignal()
        callbacks = [meter, stopper] + ([training.PruningCallback(info.trial)] if info.trial else [])
        trainer = training.build_trainer(net, tokenized, tokenizer, cfg, run_dir, callbacks,
                                         data.label_choices(raw, tokenizer, cfg.dataset, cfg.model.task))
        before = training.evaluate(trainer, cfg.model.task) if cfg.trainer.eval_before else {}
        if before:
            log.info("before training: %s", format_metrics(before))
        if resume_from:
            log.info("resuming from %s", resume_from)
        start = time.perf_counter()
        with stopper if info.stop_on_signal else contextlib.nullcontext():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        runtime = time.perf_counter() - start
        if stopper.signum:
            raise Interrupted(f"stopped by {signal.Signals(stopper.signum).name} at step "
                              f"{trainer.state.global_step} of {trainer.state.max_steps}", stopper.signum)
        after = training.evaluate(trainer, cfg.model.task)
        log.info("after training:  %s", format_metrics(after))
        if not math.isfinite(after["eval_loss"]):
            raise NonFiniteLoss(f"the eval loss is {after['eval_loss']} after training; lower "
                                f"trainer.learning_rate")

        training.save_adapter(trainer, run_dir / rundir.ADAPTER)
        metrics = {
            **after,
            **{f"{k}_before": v for k, v in before.items()},
            "trainable_params": trainable,
            "trainable_frac": trainable / total,
            "selected_modules": len(chosen),
            "lora_r": cfg.lora.r,
            "train_runtime_s": runtime,
            "train_steps": trainer.state.global_step,
            "skipped_steps": trainer.skipped_steps,
            **{k.removeprefix("perf/"): v for k, v in meter.totals(trainer.args, trainer.state).items()},
            **resources(),
        }
        if not distributed.is_main():
            return metrics
        from spectraqlora.scan import identity

        rundir.write_json(run_dir / rundir.SELECTION, selection_record(
            cfg.selection, chosen, lora_targets=targets, trainable_params=trainable,
            **({"ranks": ranks} if ranks else {}),
            base={"path": str(path), "identity": identity(files)}))  # export checks it is unchanged
        tel.summary(metrics)
        rundir.write_json(run_dir / rundir.METRICS, metrics)  # last: marks the run finished
    if not cfg.trainer.keep_checkpoints:
        shutil.rmtree(run_dir / rundir.CHECKPOINTS, ignore_errors=True)
    log.info("run finished\n%s", format_summary(metrics, run_dir, time.perf_counter() - began))
    return metrics


def format_summary(metrics: dict, run_dir: Path, wall_s: float) -> str:
    """The block a finished run ends with: where it is, what it reached, what it cost."""
    evals = "   ".join(f"{key.removeprefix('eval_')} " + (f"{metrics[key + '_before']:.4f} -> " if key + "_before" in metrics else "")
                       + f"{metrics[key]:.4f}" for key in metrics if key.startswith("eval_") and not key.endswith("_before"))
    rows = {"run dir": run_dir, "eval": evals,
            "training": f"{metrics['train_steps']} steps in {metrics['train_runtime_s']:.1f} s"
                        + (f", {metrics['tokens_per_sec']:,.0f} tokens/s" if "tokens_per_sec" in metrics else ""),
            "wall time": f"{wall_s:.1f} s", "peak memory": f"{metrics['peak_mem_gb']:.2f} GB",
            "adapter": run_dir / rundir.ADAPTER}
    return "\n".join(f"  {name:<12} {value}" for name, value in rows.items())


def resources() -> dict:
    """This process's peak memory: GPU memory allocated where there is a GPU, else RSS."""
    mem = telemetry.memory()
    return {"peak_mem_gb": mem.get("mem/peak_allocated_gb", mem["mem/peak_rss_gb"]),
            **{k.removeprefix("mem/"): v for k, v in mem.items()}}


def selection_digest(chosen: list[str]) -> str:
    """A short fingerprint of a selection: equal on every rank that trains the same modules."""
    return hashlib.sha256("\n".join(chosen).encode()).hexdigest()[:12]


def format_selection(table: dict[str, dict], chosen: list[str]) -> str:
    width = max((len(n) for n in chosen), default=6)
    lines = [f"  {'module':<{width}}  {'type':<24} {'snr':>8}"]
    for name in chosen:
        snr = table[name]["snr"]
        lines.append(f"  {name:<{width}}  {table[name]['type']:<24} "
                     f"{'-' if snr is None else f'{snr:.4f}':>8}")
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k.removeprefix('eval_')}={v:.4f}" for k, v in metrics.items())


def main() -> None:
    """The entrypoint: Hydra on the main process; under accelerate launch or torchrun, the other
    ranks take their config and run dir from it instead."""
    if distributed.launched():
        with exit_on_user_error():
            distributed.check_not_a_sweep(sys.argv[1:])
        distributed.start()
        if not distributed.is_main():
            try:
                run(*distributed.from_main())
            except distributed.MainProcessFailed:  # the main process has said why
                sys.exit(1)
            return
    hydra_main()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode is RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    single = not multirun and not distributed.launched()
    if single:
        signal.signal(signal.SIGTERM, _raise_interrupt)  # as Ctrl-C, until training handles it
    with exit_on_user_error(reraise=multirun):
        try:
            try:
                job = distributed.from_main(lambda: (to_train_config(cfg), run_dir, run_info(hydra_cfg)))
                metrics = run(*job)
            except KeyboardInterrupt as exc:
                if not single:
                    raise
                signum = exc.args[0] if exc.args else signal.SIGINT
                raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum) from None
        except UserError as exc:
            if isinstance(exc, Interrupted):
                last = rundir.last_checkpoint(run_dir)
                exc.args = (f"{exc}; " + (f"kept {last}; resume with: {resume_command(hydra_cfg, run_dir)}"
                                          if last else "no checkpoint to resume from"),)
            to_log_file(f"error: {exc}")  # the terminal gets it from exit_on_user_error
            if not multirun and distributed.is_main():
                rundir.discard_if_untrained(run_dir)  # refused before training: no empty run dir
            raise
    return metrics["eval_loss"]


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


def run_info(hydra_cfg) -> RunInfo:
    """W&B naming: the overrides as the name; in a sweep, the study (or sweep dir) as group,
    and the Optuna trial to report to when spectraqlora's sweeper runs it."""
    name = ",".join(o for o in hydra_cfg.overrides.task if not o.startswith("hydra.")) or "default"
    if hydra_cfg.mode is not RunMode.MULTIRUN:
        return RunInfo(name=name, stop_on_signal=not distributed.launched())
    group = study_name(hydra_cfg.sweeper, hydra_cfg.sweep.dir)
    return RunInfo(name=name, group=group, job_type="sweep-trial", trial=current_trial(hydra_cfg))


if __name__ == "__main__":
    main()
