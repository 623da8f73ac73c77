"""One run on several processes, as `accelerate launch` or `torchrun` starts them (DDP, FSDP).

The main process (rank 0) composes the config with Hydra, scans (or reads the scan cache),
selects, writes the run dir and logs to W&B; the other ranks take the config, the run dir and
the selection from it and train their share of each batch; all they write is their RNG
state in the Trainer's checkpoints (rng_state_<rank>.pth, for resuming).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from spectraqlora.errors import UserError


class MainProcessFailed(Exception):
    """Raised on the other ranks when the main process failed (it reports the error)."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Started by accelerate launch / torchrun with more than one process."""
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def fsdp() -> bool:
    """accelerate launch with an FSDP config (it says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def start() -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and pin this rank's GPU, before any
    model is loaded. The other ranks log spectraqlora's lines and warnings, marked with
    their rank."""
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())  # gloo across CPU processes
    if not is_main():
        logging.basicConfig(level=logging.WARNING, format=f"[rank {rank()}] %(name)s: %(message)s")
        logging.getLogger("spectraqlora").setLevel(logging.INFO)


@contextmanager
def main_first():
    """The main process of each machine first (it downloads or builds what is missing), then the
    others (they find it in the cache), so that no two processes write the same files."""
    if not launched():
        yield
        return
    from accelerate import PartialState

    with PartialState().local_main_process_first():
        yield


def from_main(compute=None):
    """compute() as run by the main process, handed to every rank (the others do not call it).
    An error there is raised on every rank: as itself on the main process, as
    MainProcessFailed elsewhere, so that no rank waits for a result that never comes."""
    if not launched():
        return compute()
    from accelerate.utils import broadcast_object_list

    result = error = None
    if is_main():
        try:
            result = compute()
        except Exception as exc:
            error = exc
    box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    try:
        broadcast_object_list(box, from_process=0)
    except RuntimeError as exc:  # the main process is gone: its own error says why
        if is_main():
            raise
        raise MainProcessFailed(str(exc)) from None
    if error is not None:
        raise error
    result, failure = box[0]
    if failure is not None:
        raise MainProcessFailed(failure)
    return result


def check_not_a_sweep(argv: list[str]) -> None:
    if not {"-m", "--multirun"} & set(argv):
        return
    if not is_main():
        raise SystemExit(1)  # the main process says why
    raise UserError("a sweep (-m) runs one process per trial: start it without accelerate "
                    "launch / torchrun (hydra.sweeper.n_jobs, or hydra/launcher=slurm, spreads "
                    "trials over GPUs)")
