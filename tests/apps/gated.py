"""A Hydra app for sweeper tests, no model. With `gate` set, each trial says it started (a file
named `started.<trial>.<worker pid>` in `gate`) and then blocks until the test releases it (a
file `release.<trial>`), so a test decides when each trial ends and can kill a worker mid-trial
at a known moment. It returns x (or `returns`, when set) and leaves `result.txt` in its run dir."""
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf


class Mark(Callback):
    """`+hydra.callbacks.mark._target_=__main__.Mark`: a line in ./callbacks.log per multirun
    start and end, from whichever process runs it."""

    def on_multirun_start(self, config, **kwargs):
        with open("callbacks.log", "a") as f:
            f.write("start\n")

    def on_multirun_end(self, config, **kwargs):
        with open("callbacks.log", "a") as f:
            f.write("end\n")


@hydra.main(config_path=str(Path(__file__).resolve().parent), config_name="gated", version_base="1.3")
def main(cfg):
    num = HydraConfig.get().job.num
    if cfg.gate:
        gate = Path(cfg.gate)
        (gate / f"started.{num}.{os.getpid()}").touch()
        while not (gate / f"release.{num}").exists():
            time.sleep(0.05)
    time.sleep(cfg.sleep)
    Path(HydraConfig.get().runtime.output_dir, "result.txt").write_text(str(cfg.x))
    if cfg.returns is None:
        return cfg.x
    return OmegaConf.to_container(cfg.returns) if OmegaConf.is_config(cfg.returns) else cfg.returns


def configure(cfg, trial) -> None:
    """hydra.sweeper.custom_search_space=__main__.configure: y within 0.5 of x."""
    trial.suggest_float("y", trial.params["x"] - 0.5, trial.params["x"] + 0.5)


if __name__ == "__main__":
    main()
