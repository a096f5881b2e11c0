"""Start-up that fails once per job: every rank runs its part, then all agree on the outcome.

Loading usually fails the same way on every rank (a bad file, a rank count that does not
divide the heads, a memory budget), and each rank aborting on its own prints the same
traceback N times. Here each rank runs its start-up, then one ``allgather`` tells every rank
what happened everywhere: on any failure every rank raises :class:`StartupError`, whose
message rank 0 prints once, and the job ends without MPI_Abort.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Failures of the operator's making (a file, a key, a budget): the message says it all.
EXPECTED = (ValueError, OSError, MemoryError)


class StartupError(RuntimeError):
    """Start-up failed on at least one rank; ``str()`` is the job's one message."""


def describe(exc: BaseException, verbose: bool = False) -> str:
    """One line for an operator error, the traceback for anything else (a bug)."""
    if isinstance(exc, EXPECTED) and not verbose:
        return str(exc) or type(exc).__name__
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def job_message(outcomes: list[str | None]) -> str | None:
    """One message for the per-rank outcomes (None = that rank succeeded)."""
    failed: dict[str, list[int]] = {}
    for rank, msg in enumerate(outcomes):
        if msg is not None:
            failed.setdefault(msg, []).append(rank)
    if not failed:
        return None
    if len(failed) == 1 and len(next(iter(failed.values()))) == len(outcomes):
        return next(iter(failed))  # the same on every rank: no need to say where
    lines = []
    for msg, ranks in failed.items():
        who = "rank" if len(ranks) == 1 else "ranks"
        lines.append(f"{who} {', '.join(map(str, ranks))}: {msg}")
    return "\n".join(lines)


def run_agreed(mpi_comm: Any, fn: Callable[[], T], verbose: bool = False) -> T:
    """Run ``fn`` on every rank of ``mpi_comm`` (collective); return its result, or raise
    ``StartupError`` on every rank if it failed on any."""
    try:
        result: T | None = fn()
        mine: str | None = None
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        result, mine = None, describe(exc, verbose)
    message = job_message(mpi_comm.allgather(mine))
    if message is not None:
        raise StartupError(message)
    return result  # type: ignore[return-value]
