"""Communicator interface shared by the MPI, torch.distributed and single-process backends.

The public methods are template methods: they run the backend's `_impl` under the
collective watchdog (if any), so every backend gets the same no-hang guarantee.
Not thread-safe: issue collectives from one thread per rank, in the same order on all ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Literal

import torch

from .abort import abort_job
from .watchdog import CollectiveWatchdog

if TYPE_CHECKING:
    from mpi4py import MPI

CommKind = Literal["auto", "mpi", "gloo", "nccl", "hccl"]


class Communicator(ABC):
    """Collectives over a fixed group of `world_size` ranks; all are blocking."""

    rank: int
    world_size: int

    def __init__(self, rank: int, world_size: int, watchdog: CollectiveWatchdog | None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.watchdog = watchdog

    # -- public API --------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks (float32/bfloat16/float16/ints); may reduce in place."""
        return self._guarded("all_reduce", self._all_reduce, t)

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's `t` (same shape on all ranks) along `dim`, rank order."""
        return self._guarded("all_gather", self._all_gather, t, dim)

    def all_to_all(self, t: torch.Tensor, send_counts: list[int],
                   recv_counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Send rows `t[off_d : off_d + send_counts[d]]` to rank d (counts may be 0).

        Returns the received rows concatenated in source-rank order and the row count
        received from each source. `recv_counts`, when the caller already knows them (a
        reply to an earlier exchange, or a second payload with the same counts), saves the
        exchange of counts; they must match what the peers send.
        """
        counts = [int(c) for c in send_counts]
        if len(counts) != self.world_size or min(counts, default=0) < 0:
            raise ValueError(f"send_counts must be {self.world_size} counts >= 0, got {counts}")
        if t.dim() == 0 or sum(counts) != t.shape[0]:
            raise ValueError(f"send_counts sum {sum(counts)} != rows {tuple(t.shape)[:1]}")
        if recv_counts is not None:
            recv_counts = [int(c) for c in recv_counts]
            if len(recv_counts) != self.world_size or min(recv_counts, default=0) < 0:
                raise ValueError(f"recv_counts must be {self.world_size} counts >= 0, got "
                                 f"{recv_counts}")
        return self._guarded("all_to_all", self._all_to_all, t, counts, recv_counts)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Return root's picklable `obj` on every rank."""
        return self._guarded("broadcast_object", self._broadcast_object, obj, root)

    def idle_broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """``broadcast_object`` for a wait that may last as long as the server is idle: not
        under the collective watchdog (a stuck peer is the heartbeat's to find), and, where
        the backend can, without burning a core while waiting."""
        return self._idle_broadcast_object(obj, root)

    def broadcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite `t` on every rank with root's `t` (same shape/dtype everywhere)."""
        return self._guarded("broadcast", self._broadcast, t, root)

    def barrier(self) -> None:
        self._guarded("barrier", self._barrier)

    def abort(self, msg: str, code: int = 1) -> None:
        """Print `rank R: msg` and terminate every rank of the job."""
        abort_job(f"rank {self.rank}: {msg}", code)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()

    # -- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor: ...

    @abstractmethod
    def _all_to_all(
        self, t: torch.Tensor, send_counts: list[int], recv_counts: list[int] | None
    ) -> tuple[torch.Tensor, list[int]]: ...

    @abstractmethod
    def _broadcast_object(self, obj: Any, root: int) -> Any: ...

    def _idle_broadcast_object(self, obj: Any, root: int) -> Any:
        return self._broadcast_object(obj, root)  # backends with a cheaper wait override it

    @abstractmethod
    def _broadcast(self, t: torch.Tensor, root: int) -> torch.Tensor: ...

    @abstractmethod
    def _barrier(self) -> None: ...

    def _guarded(self, op: str, fn, *args):
        wd = self.watchdog
        if wd is None:
            return fn(*args)
        wd.begin(op)
        try:
            return fn(*args)
        finally:
            wd.end()


class SingleProcessCommunicator(Communicator):
    """World of one: every collective is the identity (no watchdog needed)."""

    def __init__(self) -> None:
        super().__init__(0, 1, None)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t

    def _all_to_all(self, t: torch.Tensor, send_counts: list[int],
                    recv_counts: list[int] | None):
        return t, list(send_counts)

    def _broadcast_object(self, obj: Any, root: int) -> Any:
        return obj

    def _broadcast(self, t: torch.Tensor, root: int) -> torch.Tensor:
        return t

    def _barrier(self) -> None:
        return None


def default_kind(device: torch.device | str) -> CommKind:
    """cpu -> mpi, cuda -> nccl, npu -> hccl."""
    dev_type = torch.device(device).type
    kinds: dict[str, CommKind] = {"cuda": "nccl", "npu": "hccl"}
    return kinds.get(dev_type, "mpi")


def make_communicator(
    kind: CommKind = "auto",
    device: torch.device | str = "cpu",
    mpi_comm: MPI.Comm | None = None,
    timeout: float | None = 60.0,
) -> Communicator:
    """Build the communicator for `device` (`kind="auto"`) or the one named by `kind`.

    `mpi_comm` defaults to MPI.COMM_WORLD when MPI is in use; a world of one without MPI
    gets a `SingleProcessCommunicator` for "auto"/"mpi". `timeout=None` disables the
    collective watchdog.
    """
    if kind == "auto":
        kind = default_kind(device)
    if kind not in ("mpi", "gloo", "nccl", "hccl"):
        raise ValueError(f"unknown communicator kind {kind!r}")
    if mpi_comm is None and kind == "mpi":
        return SingleProcessCommunicator()
    if kind == "mpi":
        from .mpi_communicator import MPICommunicator

        return MPICommunicator(mpi_comm, timeout=timeout)
    from .torch_dist_communicator import TorchDistCommunicator

    return TorchDistCommunicator(kind, torch.device(device), mpi_comm=mpi_comm, timeout=timeout)
