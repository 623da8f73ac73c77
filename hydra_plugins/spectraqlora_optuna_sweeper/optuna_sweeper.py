"""The Sweeper Hydra discovers; the work happens in spectraqlora.sweep.sweeper (imported only when sweeping)."""
from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class SpectraOptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from spectraqlora.sweep.sweeper import SweeperImpl

        self.sweeper = SweeperImpl(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        return self.sweeper.sweep(arguments)
