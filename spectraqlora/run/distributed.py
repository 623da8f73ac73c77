"""One run on several processes, as `accelerate launch` or `torchrun` starts them (DDP, FSDP).

`Launch` is decided once, at the top of the entrypoint, from the environment the launcher sets,
and passed down: nothing below reads the environment for it. The main process (rank 0) composes
the config with Hydra, claims the run dir, scans (or reads the scan cache) and selects, and hands
the other ranks that plan in one broadcast (`Launch.share`); they train their share of each
batch, and all they write is their RNG state in the Trainer's checkpoints (rng_state_<rank>.pth,
for resuming).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

from spectraqlora.errors import UserError


class MainProcessFailed(Exception):
    """Raised on the other ranks when the main process failed (it reports the error)."""


@dataclass(frozen=True)
class Launch:
    """How this process was started: one process (the default), or one rank of a launch."""

    world_size: int = 1
    rank: int = 0
    fsdp: bool = False  # accelerate launch with an FSDP config

    @classmethod
    def from_env(cls) -> Launch:
        """What accelerate launch / torchrun say in the environment (nothing: one process)."""
        return cls(world_size=int(os.environ.get("WORLD_SIZE", "1")), rank=int(os.environ.get("RANK", "0")),
                   fsdp=os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1"))

    @property
    def launched(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self) -> None:
        """Join the process group (NCCL on GPUs, gloo on CPUs) and pin this rank's GPU, before
        any model is loaded. The other ranks log spectraqlora's lines and warnings, marked with
        their rank."""
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # gloo across CPU processes
        if not self.is_main:
            logging.basicConfig(level=logging.WARNING, format=f"[rank {self.rank}] %(name)s: %(message)s")
            logging.getLogger("spectraqlora").setLevel(logging.INFO)

    @contextmanager
    def main_first(self):
        """The main process of each machine first (it downloads or builds what is missing),
        then the others (they find it in the cache), so that no two processes write the same
        files. Every rank must enter it."""
        if not self.launched:
            yield
            return
        from accelerate import PartialState

        with PartialState().local_main_process_first():
            yield

    def share(self, compute=None):
        """compute() as run by the main process, handed to every rank in one broadcast (the
        others pass nothing). An error there is raised on every rank: as itself on the main
        process, as MainProcessFailed elsewhere, so that no rank waits for a result that never
        comes. Every rank must call it the same number of times: a run makes one call."""
        if not self.launched:
            return compute()
        from accelerate.utils import broadcast_object_list

        result = error = None
        if self.is_main:
            try:
                result = compute()
            except Exception as exc:
                error = exc
        box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
        try:
            broadcast_object_list(box, from_process=0)
        except RuntimeError as exc:  # the main process is gone: its own error says why
            if self.is_main:
                raise
            raise MainProcessFailed(str(exc)) from None
        if error is not None:
            raise error
        result, failure = box[0]
        if failure is not None:
            raise MainProcessFailed(failure)
        return result

    def check_not_a_sweep(self, argv: list[str]) -> None:
        if not {"-m", "--multirun"} & set(argv):
            return
        if not self.is_main:
            raise SystemExit(1)  # the main process says why
        raise UserError("a sweep (-m) runs one process per trial: start it without accelerate "
                        "launch / torchrun (hydra.sweeper.n_jobs, or hydra/launcher=slurm, spreads "
                        "trials over GPUs)")


SINGLE = Launch()  # one process
