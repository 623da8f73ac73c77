"""`python -m spectraqlora.evaluate run_dir=<finished run dir>`: reload base + adapter, re-evaluate.

Uses the run's own config (.hydra/config.yaml) for model, quantization and data, prints the
metrics beside those the run recorded and writes them to <run_dir>/eval_metrics.json.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from spectraqlora import cli
from spectraqlora.config import CONF_DIR, EvaluateConfig, Logger, checked, load_run_config, show_progress
from spectraqlora.errors import exit_on_user_error
from spectraqlora.run import telemetry
from spectraqlora.store import rundir

log = logging.getLogger("spectraqlora.evaluate")


def evaluate_run(run_dir: Path | None, **options) -> dict:
    """The run's model evaluated again; `options`: the other keys of EvaluateConfig."""
    opts = checked(EvaluateConfig(run_dir=run_dir, **options))
    run_dir = rundir.finished_run(run_dir and Path(run_dir), "evaluate")
    cfg = load_run_config(run_dir)
    from spectraqlora.data import dataset  # torch: after the checks
    from spectraqlora.run import build, loop

    cfg.logger.name = Logger.none  # a re-evaluation is not a new W&B run
    telemetry.configure_progress(show_progress(cfg.logger))  # piped: plain lines, no bars
    inputs = build.load_inputs(cfg)
    dataset.check_same_data(rundir.read_json(run_dir / rundir.SELECTION).get("data"), inputs.raw, opts.force)
    tokenized, choices = inputs.tokenized(cfg, splits=("eval",))  # the train rows are never read
    net = build.trained_model(inputs, cfg, run_dir / rundir.ADAPTER, opts.allow_pickle)
    with tempfile.TemporaryDirectory(prefix="spectraqlora-eval-") as scratch:  # the Trainer's output dir
        trainer = loop.build_trainer(net, tokenized, inputs.tokenizer, cfg, Path(scratch), choices=choices)
        metrics = loop.evaluate(trainer, cfg.model.task)
    recorded = rundir.read_json(run_dir / rundir.METRICS)
    for key, value in metrics.items():
        log.info("%-16s %.6f (run recorded %.6f)", key, value, recorded.get(key, float("nan")))
    rundir.write_json(run_dir / "eval_metrics.json", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        evaluate_run(**dataclasses.asdict(OmegaConf.to_object(cfg)))


def main() -> None:
    cli.run(hydra_main, "evaluate")


if __name__ == "__main__":
    main()
