"""Rank 0 publishes each step (a batch, or shutdown) to the other ranks.

Worker ranks spend the server's idle time waiting here, so the wait must neither time out
(it is not under the collective watchdog) nor burn a core: over MPI the header arrives by a
non-blocking broadcast that is polled tightly for a few milliseconds (a busy server's next
step comes quickly), then with short sleeps. The payload follows as one pickled broadcast.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import numpy as np

from llama_mpi.parallel.communicator import Communicator

SPIN_SECONDS = 0.02
SLEEP_SECONDS = 0.0005


class StepChannel:
    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self._mpi = getattr(comm, "comm", None)  # mpi4py communicator, if MPI-backed
        self._header = np.zeros(1, dtype=np.int64)

    def publish(self, obj: Any) -> None:
        """Root: send ``obj`` (None means shut down) to every rank."""
        if self._mpi is None:
            self.comm.broadcast_object(obj)
            return
        payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        self._header[0] = payload.size
        self._mpi.Ibcast(self._header, root=0).Wait()
        self._mpi.Bcast(payload, root=0)

    def receive(self) -> Any:
        """Worker: wait (without a deadline) for the next object from the root."""
        if self._mpi is None:
            return self.comm._broadcast_object(None, 0)  # unguarded: idle waits are unbounded
        req = self._mpi.Ibcast(self._header, root=0)
        start = time.monotonic()
        while not req.Test():
            if time.monotonic() - start > SPIN_SECONDS:
                time.sleep(SLEEP_SECONDS)
        payload = np.empty(int(self._header[0]), dtype=np.uint8)
        self._mpi.Bcast(payload, root=0)
        return pickle.loads(payload.tobytes())
