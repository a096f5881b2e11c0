"""Rank 0 publishes each step (a batch, or None to shut down) to the other ranks.

Worker ranks spend the server's idle time waiting here, so the wait uses the communicator's
``idle_broadcast_object``: no collective deadline (a stuck peer is the heartbeat's to find)
and, over MPI, no core burnt while waiting.
"""

from __future__ import annotations

from typing import Any

from llama_mpi.parallel.communicator import Communicator


class StepChannel:
    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    def publish(self, obj: Any) -> None:
        """Root: send ``obj`` (None means shut down) to every rank."""
        self.comm.idle_broadcast_object(obj, root=0)

    def receive(self) -> Any:
        """Worker: wait (without a deadline) for the next object from the root."""
        return self.comm.idle_broadcast_object(None, root=0)
