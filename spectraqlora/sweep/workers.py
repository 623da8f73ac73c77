"""Local sweep workers: more processes of the same Hydra app on this machine, sharing the study
(hydra.sweeper.workers), each on a GPU of its own where there are several."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
WORKER_ENV = "SPECTRAQLORA_SWEEP_WORKER"  # set in the workers a sweep starts: they start none


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


def spawn_workers(count: int, task_function, hydra_cfg, url: str, study_name: str,
                  sweep_dir: Path) -> list[subprocess.Popen]:
    """count - 1 more processes of this Hydra app, sharing the study; each asks for its next
    trial when free (no batch waits for its slowest)."""
    if count <= 1:
        return []
    cmd = [*app_command(task_function), "-m", f"--config-name={hydra_cfg.job.config_name}",
           *hydra_cfg.overrides.hydra, *hydra_cfg.overrides.task, "hydra.sweeper.workers=1",
           f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={study_name}",
           f"hydra.sweep.dir={sweep_dir.resolve()}",
           # Hydra's callbacks (on_multirun_start/end: reports) run once, in this process
           *(f"~hydra.callbacks.{name}" for name in hydra_cfg.callbacks or {})]
    log.info("starting %d more sweep workers", count - 1)
    gpus = _gpus()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]  # this process: before CUDA starts
    return [subprocess.Popen(cmd, env={**os.environ, WORKER_ENV: "1", **(
                {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {})})
            for i in range(1, count)]


def _gpus() -> list[str]:
    """GPU ids to spread workers over: several GPUs and no CUDA_VISIBLE_DEVICES given."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return []
    import torch

    count = torch.cuda.device_count()
    return [str(i) for i in range(count)] if count > 1 else []
