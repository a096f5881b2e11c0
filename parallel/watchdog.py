"""Deadline for every collective, so no rank blocks forever on a peer that stopped.

The hot path only stores a tuple (`begin`) and clears it (`end`): a single attribute store
is atomic under the GIL, so no lock is needed. A daemon thread polls it a few times per
timeout and aborts the job through MPI when a collective runs past its deadline. Blocking
MPI and c10d calls release the GIL, so the thread runs while the main thread waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .abort import abort_job

DEFAULT_TIMEOUT_S = 60.0


def timeout_message(rank: int, op: str, timeout: float) -> str:
    return f"rank {rank}: collective {op} exceeded {timeout:g} s; aborting the job"


class CollectiveWatchdog:
    """Aborts the job when a collective between `begin` and `end` exceeds `timeout` s."""

    def __init__(
        self,
        rank: int,
        timeout: float = DEFAULT_TIMEOUT_S,
        on_timeout: Callable[[str], None] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"watchdog timeout must be > 0, got {timeout}")
        self.rank = rank
        self.timeout = float(timeout)
        self._on_timeout = on_timeout or (lambda msg: abort_job(msg, 1))
        self._current: tuple[str, float] | None = None  # (op, monotonic start)
        self._stop = threading.Event()
        # Poll often enough that the abort comes at most ~25 % after the deadline.
        self._poll = min(max(self.timeout / 4, 0.05), 1.0)
        self._thread = threading.Thread(
            target=self._run, name=f"collective-watchdog-r{rank}", daemon=True
        )
        self._thread.start()

    def begin(self, op: str) -> None:
        self._current = (op, time.monotonic())

    def end(self) -> None:
        self._current = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self._poll)

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            current = self._current
            if current is None:
                continue
            op, started = current
            if time.monotonic() - started > self.timeout:
                self._on_timeout(timeout_message(self.rank, op, self.timeout))
                return
