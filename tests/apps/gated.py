"""A Hydra app for sweeper tests, no model: each trial says it started (a file named
`started.<trial>.<worker pid>` in `gate`) and then blocks until the test releases it (a file
`release.<trial>`), so a test decides when each trial ends and can kill a worker mid-trial at a
known moment. It returns x and leaves `result.txt` in its run dir."""
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(config_path=".", config_name="gated", version_base="1.3")
def main(cfg) -> float:
    gate, num = Path(cfg.gate), HydraConfig.get().job.num
    (gate / f"started.{num}.{os.getpid()}").touch()
    while not (gate / f"release.{num}").exists():
        time.sleep(0.05)
    Path(HydraConfig.get().runtime.output_dir, "result.txt").write_text(str(cfg.x))
    return cfg.x


if __name__ == "__main__":
    main()
