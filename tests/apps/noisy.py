"""A Hydra app for repeated sweeps, no model: it returns objective(x, seed), 0.1 (x - 3)^2 plus
noise drawn from the seed, mostly shared by every x (as a seed's data order and initialisation
are shared by every setting) and partly not. With `die_once` set to a seed, the first run of
that seed kills its own process (Hydra's basic launcher runs jobs in the sweep's process: the
sweep dies mid-trial, as a killed worker does); later runs of it go through."""
import math
import os
from pathlib import Path

import hydra


def objective(x: float, seed: int) -> float:
    return 0.1 * (x - 3) ** 2 + 0.05 * math.sin(12.9898 * seed) + 0.01 * math.sin(78.233 * seed * (x + 1))


@hydra.main(config_path=str(Path(__file__).resolve().parent), config_name="noisy", version_base="1.3")
def main(cfg):
    if cfg.die_once is not None and cfg.seed == cfg.die_once:
        marker = Path(cfg.marker_dir) / f"died.{cfg.seed}"
        if not marker.exists():
            marker.touch()
            os._exit(9)
    return objective(cfg.x, cfg.seed)


if __name__ == "__main__":
    main()
