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
        sys.exit(2)
