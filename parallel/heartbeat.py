"""Liveness between ranks that does not wait for a collective to time out.

Every rank binds a UDP socket; the addresses are exchanged once at start-up. A daemon thread
on each worker sends a datagram to rank 0 every ``interval`` seconds and rank 0's thread
sends one to every worker; each thread also reads what arrives. A peer silent for
``timeout`` seconds ends the job, naming it (MPI_Abort from the rank that noticed).

A stopped (SIGSTOP), frozen or vanished process stops its thread too, so silence is what a
stuck rank looks like. A rank that is merely busy (a long prefill, a wait inside a
collective) keeps beating: the thread needs the GIL for microseconds, and blocking MPI,
torch and C-kernel calls release it. A deadlock between live ranks is the collective
watchdog's job (``collective_timeout``).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from .abort import abort_job

log = logging.getLogger(__name__)

_BEAT, _BYE = 1, 2
_PACKET = struct.Struct("!QiI")  # job token, sender rank, kind


def silence_message(rank: int, peer: int, seconds: float) -> str:
    return (f"rank {rank}: rank {peer} has sent no heartbeat for {seconds:.1f} s (stopped, "
            f"hung or unreachable); ending the job")


class Heartbeat:
    """Rank 0 <-> every worker beats over UDP; see the module doc."""

    def __init__(
        self,
        rank: int,
        addresses: list[tuple[str, int]],
        sock: socket.socket,
        token: int,
        timeout: float = 10.0,
        interval: float | None = None,
        on_timeout: Callable[[str], None] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"heartbeat timeout must be > 0, got {timeout}")
        self.rank, self.timeout, self.token = rank, float(timeout), token
        self.interval = interval if interval is not None else min(0.5, self.timeout / 8)
        # /health reports a peer as unresponsive well before the job is ended
        self.suspect_after = min(self.timeout, max(1.5, 3 * self.interval))
        self._sock = sock
        peers = range(1, len(addresses)) if rank == 0 else [0]
        self._targets = {p: addresses[p] for p in peers}
        now = time.monotonic()
        self._last = {p: now for p in peers}  # peer -> when last heard
        self._on_timeout = on_timeout or (lambda msg: abort_job(msg, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-r{rank}", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, mpi_comm: Any, timeout: float = 10.0, interval: float | None = None,
              on_timeout: Callable[[str], None] | None = None) -> Heartbeat:
        """Collective over ``mpi_comm``: bind, exchange addresses, start beating."""
        rank = mpi_comm.Get_rank()
        hosts = mpi_comm.allgather(socket.gethostname())
        one_host = len(set(hosts)) == 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1" if one_host else "0.0.0.0", 0))
        sock.setblocking(False)
        host = "127.0.0.1" if one_host else socket.gethostbyname(hosts[rank])
        addresses = mpi_comm.allgather((host, sock.getsockname()[1]))
        token = mpi_comm.bcast(int.from_bytes(os.urandom(8), "big") if rank == 0 else None)
        return cls(rank, addresses, sock, token, timeout, interval, on_timeout)

    def silent_for(self) -> dict[int, float]:
        """Seconds since each monitored peer was last heard."""
        now = time.monotonic()
        return {p: now - t for p, t in list(self._last.items())}

    def health(self) -> str | None:
        """None if every peer beats, else which one has gone quiet."""
        quiet = {p: s for p, s in self.silent_for().items() if s > self.suspect_after}
        if not quiet:
            return None
        peer, seconds = max(quiet.items(), key=lambda kv: kv[1])
        return (f"rank {peer} has not answered heartbeats for {seconds:.1f} s; the job ends "
                f"at {self.timeout:g} s")

    def close(self) -> None:
        """Stop beating and tell the peers this rank leaves on purpose (no alarm)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 1)
        self._send(_BYE)
        self._sock.close()

    def _send(self, kind: int) -> None:
        packet = _PACKET.pack(self.token, self.rank, kind)
        for addr in self._targets.values():
            try:
                self._sock.sendto(packet, addr)
            except OSError:  # a full buffer or a gone peer: silence will tell
                pass

    def _receive(self, wait: float) -> None:
        ready, _, _ = select.select([self._sock], [], [], max(wait, 0.0))
        while ready:
            try:
                data, _ = self._sock.recvfrom(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(data) != _PACKET.size:
                continue
            token, peer, kind = _PACKET.unpack(data)
            if token != self.token or peer not in self._last:
                continue
            if kind == _BYE:
                self._last.pop(peer, None)
            else:
                self._last[peer] = time.monotonic()

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._send(_BEAT)
                next_beat = now + self.interval
            self._receive(next_beat - now)
            for peer, seconds in self.silent_for().items():
                if seconds > self.timeout and not self._stop.is_set():
                    self._on_timeout(silence_message(self.rank, peer, seconds))
                    return
