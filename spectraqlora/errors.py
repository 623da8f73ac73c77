"""User-facing errors: one clear line and a non-zero exit instead of a traceback."""
from __future__ import annotations

import contextlib
import sys


class UserError(Exception):
    """Bad input the user can fix; its message says what to type instead."""


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops rather than report a fake number."""


class OutOfMemory(UserError):
    """The accelerator ran out of memory; the message names the configuration that did it."""


class Interrupted(UserError):
    """SIGINT or SIGTERM: the run stopped on purpose; the message says what was kept and how to
    go on. Exits 128 + the signal number, as a shell reports a process ended by it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def exit_on_user_error(reraise: bool = False):
    """Turn a UserError into one `error:` line and exit status 2.

    With reraise (trials of a multirun), the error propagates so the sweeper can record it.
    """
    try:
        yield
    except UserError as exc:
        if reraise:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
