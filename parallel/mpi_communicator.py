"""Communicator on mpi4py, working in place on the tensors' CPU memory (zero-copy).

Device tensors (cuda/npu) are staged through host memory; on CPU nothing is copied
unless a tensor is non-contiguous.
"""

from __future__ import annotations

import pickle
import time
from typing import Any, Literal

import numpy as np
import torch
from mpi4py import MPI

from .communicator import Communicator
from .mpi_buffers import move_spec, reduce_spec, row_type
from .watchdog import CollectiveWatchdog

Bf16Reduce = Literal["op", "upcast"]
IDLE_SPIN_S = 0.02  # idle wait: poll tightly this long, then
IDLE_SLEEP_S = 0.0005  # sleep this long between polls


def _host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with t's values: t itself when it already is one."""
    if t.device.type == "cpu" and t.is_contiguous():
        return t
    return t.detach().to("cpu", copy=True).contiguous()


def _write_back(t: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    if host is not t:
        t.copy_(host)
    return t


class MPICommunicator(Communicator):
    """Collectives through mpi4py's buffer interface on `comm` (default COMM_WORLD)."""

    def __init__(
        self,
        comm: MPI.Comm | None = None,
        timeout: float | None = 60.0,
        bf16_reduce: Bf16Reduce = "op",
    ) -> None:
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        watchdog = CollectiveWatchdog(rank, timeout) if timeout else None
        super().__init__(rank, size, watchdog)
        # "op": user-defined MPI Op adding bf16 words (run/bench_comm.py: faster at 8 MiB);
        # "upcast": fp32 Allreduce then round once (more accurate, 3x the traffic).
        self.bf16_reduce = bf16_reduce

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        host = _host(t)
        if host.dtype == torch.bfloat16 and self.bf16_reduce == "upcast":
            acc = host.float()
            self.comm.Allreduce(MPI.IN_PLACE, [acc.numpy(), MPI.FLOAT], op=MPI.SUM)
            host.copy_(acc)
        else:
            view, mpi_type, op = reduce_spec(host)
            self.comm.Allreduce(MPI.IN_PLACE, [view, mpi_type], op=op)
        return _write_back(t, host)

    def _all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        host = _host(t)
        out = torch.empty((self.world_size, *host.shape), dtype=host.dtype)
        send, mpi_type = move_spec(host)
        recv, _ = move_spec(out)
        self.comm.Allgather([send, mpi_type], [recv, mpi_type])
        if t.dim() == 0:
            gathered = out
        elif dim % t.dim() == 0:
            gathered = out.reshape(self.world_size * host.shape[0], *host.shape[1:])
        else:
            gathered = torch.cat(out.unbind(0), dim=dim)
        return gathered.to(t.device)

    def _all_to_all(self, t: torch.Tensor, send_counts: list[int],
                    recv_counts: list[int] | None):
        send_np = np.asarray(send_counts, dtype=np.int64)
        if recv_counts is None:
            recv_np = np.empty(self.world_size, dtype=np.int64)
            self.comm.Alltoall([send_np, MPI.INT64_T], [recv_np, MPI.INT64_T])
            recv_counts = recv_np.tolist()
        else:
            recv_np = np.asarray(recv_counts, dtype=np.int64)
        host = _host(t)
        out = torch.empty((sum(recv_counts), *host.shape[1:]), dtype=host.dtype)
        row_elems = int(np.prod(host.shape[1:], dtype=np.int64))
        if row_elems > 0:
            send, base = move_spec(host)
            recv, _ = move_spec(out)
            rtype = row_type(base, row_elems)
            send_displs = np.concatenate(([0], np.cumsum(send_np)[:-1]))
            recv_displs = np.concatenate(([0], np.cumsum(recv_np)[:-1]))
            self.comm.Alltoallv(
                [send, (send_np, send_displs), rtype], [recv, (recv_np, recv_displs), rtype]
            )
        return out.to(t.device), recv_counts

    def _broadcast_object(self, obj: Any, root: int) -> Any:
        return self.comm.bcast(obj, root=root)

    def _idle_broadcast_object(self, obj: Any, root: int) -> Any:
        # The size arrives by a non-blocking broadcast, polled tightly for a few milliseconds
        # (a busy server's next step comes quickly), then with short sleeps; then the payload.
        header = np.zeros(1, dtype=np.int64)
        if self.rank == root:
            payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL),
                                    np.uint8)
            header[0] = payload.size
            self.comm.Ibcast(header, root=root).Wait()
            self.comm.Bcast(payload, root=root)
            return obj
        req = self.comm.Ibcast(header, root=root)
        start = time.monotonic()
        while not req.Test():
            if time.monotonic() - start > IDLE_SPIN_S:
                time.sleep(IDLE_SLEEP_S)
        payload = np.empty(int(header[0]), dtype=np.uint8)
        self.comm.Bcast(payload, root=root)
        return pickle.loads(payload.tobytes())

    def _broadcast(self, t: torch.Tensor, root: int) -> torch.Tensor:
        host = _host(t)
        view, mpi_type = move_spec(host)
        self.comm.Bcast([view, mpi_type], root=root)
        return _write_back(t, host)

    def _barrier(self) -> None:
        self.comm.Barrier()
