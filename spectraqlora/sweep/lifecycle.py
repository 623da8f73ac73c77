"""A trial's life beyond its own worker: heartbeats while it runs, FAIL for trials whose worker
died (a dead process on this machine at once, others once their heartbeat is older than the
grace period), and the failure count that stops a sweep."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import optuna

log = logging.getLogger(__name__)
State = optuna.trial.TrialState
HEARTBEAT = "heartbeat"  # trial user attr: time.time() of the worker's last sign of life
LOST = "worker_lost"  # trial user attr: FAIL because its worker died or was stopped, not by its own error


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lost(trial: optuna.trial.FrozenTrial) -> bool:
    """FAIL because its worker died or was stopped: neither counted in n_trials nor a failure."""
    return trial.state is State.FAIL and bool(trial.user_attrs.get(LOST))


def _silence(trial: optuna.trial.FrozenTrial) -> float:
    """Seconds since the trial's last heartbeat (or its start, before the first one)."""
    last = trial.user_attrs.get(HEARTBEAT) or trial.datetime_start.timestamp()
    return time.time() - last


class Heartbeat:
    """Stamps the running trials' HEARTBEAT attr every `interval` seconds while their jobs run,
    so that other workers can tell a live trial from one whose worker died. A user attr works
    the same on every storage (RDB and journal); workers' clocks must agree to well within the
    grace period (NTP)."""

    def __init__(self, storage, trial_ids: list[int], interval: int):
        self.stopped = threading.Event()

        def beat():
            while True:
                try:
                    for trial_id in trial_ids:
                        storage.set_trial_user_attr(trial_id, HEARTBEAT, time.time())
                except Exception as exc:  # told (FAIL) by another worker, or the storage hiccuped
                    log.warning("heartbeat not recorded: %s", exc)
                if self.stopped.wait(interval):
                    return

        self.thread = threading.Thread(target=beat, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def dead_trials(study: optuna.Study, grace_period: float) -> list[tuple[int, str]]:
    """(trial number, why) for the RUNNING trials whose worker died: a dead process on this
    machine at once, others once their heartbeat is older than the grace period."""
    host, dead = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        pid = t.user_attrs.get("worker_pid")
        if t.user_attrs.get("worker_host") == host and pid and not _alive(pid):
            dead.append((t.number, f"its sweep worker (pid {pid}) died"))
        elif _silence(t) > grace_period:
            dead.append((t.number, f"no heartbeat for {_silence(t):.0f} s (grace period {grace_period} s): "
                                   f"its sweep worker ({t.user_attrs.get('worker_host')}, pid {pid}) died"))
    return dead


def failure_stop(study: optuna.Study, max_failure_rate: float, n_trials: int) -> str | None:
    """The error that stops the sweep once too many trials failed (lost ones do not count), else None."""
    failed = [t for t in study.get_trials(deepcopy=False, states=(State.FAIL,)) if not lost(t)]
    if len(failed) <= max_failure_rate * n_trials:
        return None
    return (f"sweep stopped: {len(failed)} trials failed, more than hydra.sweeper."
            f"max_failure_rate={max_failure_rate} of n_trials={n_trials}; last "
            f"error (trial {failed[-1].number}): {failed[-1].user_attrs.get('error')}")

