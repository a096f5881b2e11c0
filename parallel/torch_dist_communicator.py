"""Communicator on torch.distributed: gloo (CPU), nccl (cuda) or hccl (npu).

Ranks come from MPI; only the TCPStore address is exchanged over MPI at start-up: rank 0
opens the store on a free port (port=0) and broadcasts (host, port). After that every
collective goes through c10d (mixing MPI and gloo calls in a hot loop costs ~4 ms each).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .communicator import Communicator
from .watchdog import CollectiveWatchdog

if TYPE_CHECKING:
    from mpi4py import MPI

_DEVICE_BACKENDS = {"gloo": "cpu", "nccl": "cuda", "hccl": "npu"}


def _store_host(mpi_comm: MPI.Comm | None) -> str:
    """Address the other ranks use to reach rank 0's store."""
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    if mpi_comm is None:
        return "127.0.0.1"
    from mpi4py import MPI

    node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
    single_node = node.Get_size() == mpi_comm.Get_size()
    node.Free()
    return "127.0.0.1" if single_node else socket.gethostbyname(socket.gethostname())


def _make_store(mpi_comm: MPI.Comm | None, timeout: timedelta) -> tuple[dist.Store, int, int]:
    rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
    size = 1 if mpi_comm is None else mpi_comm.Get_size()
    host = _store_host(mpi_comm)
    store = None
    if rank == 0:
        # wait_for_workers=False: the others only learn the port after we return.
        store = dist.TCPStore(host, 0, size, True, timeout=timeout, wait_for_workers=False)
    addr = (host, store.port if store is not None else 0)
    if mpi_comm is not None:
        addr = mpi_comm.bcast(addr, root=0)
    if store is None:
        store = dist.TCPStore(addr[0], addr[1], size, False, timeout=timeout)
    return store, rank, size


class TorchDistCommunicator(Communicator):
    """Default process group of `backend`, bootstrapped through `mpi_comm`."""

    def __init__(
        self,
        backend: str,
        device: torch.device | None = None,
        mpi_comm: MPI.Comm | None = None,
        timeout: float | None = 60.0,
    ) -> None:
        if backend not in _DEVICE_BACKENDS:
            raise ValueError(f"backend must be one of {sorted(_DEVICE_BACKENDS)}, got {backend!r}")
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process")
        self.backend = backend
        self.device = device if device is not None else torch.device(_DEVICE_BACKENDS[backend])
        # c10d's own timeout only backs up our watchdog, whose message names the op.
        c10d_timeout = timedelta(seconds=max(2 * (timeout or 300.0), (timeout or 300.0) + 30))
        store, rank, size = _make_store(mpi_comm, c10d_timeout)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=size, timeout=c10d_timeout
        )
        watchdog = CollectiveWatchdog(rank, timeout) if timeout else None
        super().__init__(rank, size, watchdog)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == self.device.type and t.is_contiguous():
            return t
        return t.to(self.device).contiguous()

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        buf = self._on_device(t)
        dist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
        return t

    def _all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        buf = self._on_device(t).reshape(1, *t.shape) if t.dim() == 0 else self._on_device(t)
        # gloo wants the output as the inputs concatenated along dim 0
        out = buf.new_empty((self.world_size * buf.shape[0], *buf.shape[1:]))
        dist.all_gather_single(out, buf)
        if t.dim() == 0 or dim % t.dim() == 0:
            return out
        return torch.cat(out.chunk(self.world_size, dim=0), dim=dim)

    def _all_to_all(self, t: torch.Tensor, send_counts: list[int],
                    recv_counts: list[int] | None):
        if recv_counts is None:
            send = torch.tensor(send_counts, dtype=torch.int64, device=self.device)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)
            recv_counts = recv.tolist()  # host sync: the payload shapes depend on it
        buf = self._on_device(t)
        out = buf.new_empty((sum(recv_counts), *buf.shape[1:]))
        dist.all_to_all_single(
            out, buf, output_split_sizes=recv_counts, input_split_sizes=send_counts
        )
        return out, recv_counts

    def _broadcast_object(self, obj: Any, root: int) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=root, device=self._object_device())
        return box[0]

    def _broadcast(self, t: torch.Tensor, root: int) -> torch.Tensor:
        buf = self._on_device(t)
        dist.broadcast(buf, src=root)
        if buf is not t:
            t.copy_(buf)
        return t

    def _barrier(self) -> None:
        dist.barrier()

    def _object_device(self) -> torch.device | None:
        return None if self.backend == "gloo" else self.device

    def close(self) -> None:
        super().close()
        if dist.is_initialized():
            dist.destroy_process_group()
