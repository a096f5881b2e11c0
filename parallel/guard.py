"""Fail fast: an exception or SIGTERM on one rank takes the whole job down.

Without this, a rank that dies leaves its peers blocked in the next collective.
`python -m mpi4py` gives a similar abort, but these hooks also name the failing rank.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from .abort import abort_job, world_rank

T = TypeVar("T")


def failure_message(rank: int, exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"rank {rank} failed: {tb}"


def run_guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn`; on an exception print `rank R failed: <traceback>` and abort the job.

    `SystemExit(0)`/`SystemExit(None)` pass through (a clean exit); any other exit code
    aborts, since peers would otherwise wait for this rank.
    """
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        code = exc.code if isinstance(exc.code, int) else 1
        abort_job(f"rank {world_rank()} exited with status {exc.code}; aborting the job", code)
    except BaseException as exc:
        abort_job(failure_message(world_rank(), exc), 1)


def install_excepthook(threads: bool = False) -> None:
    """Make an uncaught exception abort the job (main thread; other threads if `threads`)."""

    def hook(exc_type, exc, tb) -> None:
        if exc is None:
            exc = exc_type()
        abort_job(failure_message(world_rank(), exc.with_traceback(tb)), 1)

    sys.excepthook = hook
    if threads:

        def thread_hook(args: threading.ExceptHookArgs) -> None:
            if args.exc_type is SystemExit:
                return
            exc = args.exc_value or args.exc_type()
            abort_job(failure_message(world_rank(), exc.with_traceback(args.exc_traceback)), 1)

        threading.excepthook = thread_hook


def install_sigterm_handler(on_term: Callable[[], None] | None = None) -> None:
    """SIGTERM handler for the server; call from the main thread.

    With `on_term` (e.g. "stop accepting requests, drain, exit"), the first SIGTERM calls it
    and a second one aborts. Without it, SIGTERM aborts the job at once with status 143.
    """
    received = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal received
        received += 1
        if on_term is not None and received == 1:
            on_term()
            return
        abort_job(f"rank {world_rank()}: received SIGTERM; aborting the job", 128 + signum)

    signal.signal(signal.SIGTERM, handler)
