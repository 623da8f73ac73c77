"""`python -m spectraqlora.scan model=... [selection=...]`: the scan and the selection alone,
without training: snr.json, selection.json, the heatmap and Spectrum-compatible files in the run
dir (spectrum/scanner.py does the scan)."""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from spectraqlora import cli
from spectraqlora.config import CONF_DIR, TrainConfig, show_progress, to_train_config
from spectraqlora.errors import UserError, exit_on_user_error
from spectraqlora.spectrum.selection import selection_record
from spectraqlora.store import checkpoint, rundir

log = logging.getLogger("spectraqlora.scan")

SCAN_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json"]


def scan_to_dir(cfg: TrainConfig, run_dir: Path) -> list[str]:
    """Scan (fetching only safetensors from a hub), select, and write the scan's run dir."""
    from spectraqlora.run import telemetry
    from spectraqlora.spectrum import artifacts
    from spectraqlora.spectrum.scanner import scan_and_select  # torch: after the config is checked

    telemetry.configure_progress(show_progress(cfg.logger))  # a GGUF conversion's bars too
    path = checkpoint.resolve(cfg.model, SCAN_PATTERNS)
    table, chosen = scan_and_select(checkpoint.safetensors_files(path), cfg)
    kept = getattr(cfg.selection, "top_frac", len(chosen) / max(len(table), 1))  # names spectrum.py's file
    artifacts.write_all(run_dir, table, chosen, artifacts.slug(cfg.model.name_or_path), kept)
    rundir.write_json(run_dir / rundir.SELECTION, selection_record(cfg.selection, chosen))
    log.info("spectrum scan of %s: %d candidates, %d selected (%s)\n%s", cfg.model.name_or_path,
             len(table), len(chosen), cfg.selection.strategy.value, artifacts.summary(table, chosen))
    log.info("wrote %s", run_dir)
    return chosen


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="scan")
def hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with exit_on_user_error():
        try:
            scan_to_dir(to_train_config(cfg), run_dir)
        except UserError:
            rundir.discard_if_untrained(run_dir)  # a refused scan leaves no dir behind
            raise


def main() -> None:
    cli.run(hydra_main, "scan")


if __name__ == "__main__":
    main()
