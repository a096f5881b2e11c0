"""Heartbeats between ranks, in one process: two ``Heartbeat`` ends over real UDP sockets."""

from __future__ import annotations

import socket
import threading
import time

from llama_mpi.parallel.heartbeat import Heartbeat


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


class Alarm:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.fired = threading.Event()

    def __call__(self, msg: str) -> None:
        self.messages.append(msg)
        self.fired.set()


def _pair(timeout: float, interval: float) -> tuple[Heartbeat, Heartbeat, Alarm, Alarm]:
    s0, s1 = _socket(), _socket()
    addrs = [s0.getsockname(), s1.getsockname()]
    a0, a1 = Alarm(), Alarm()
    h0 = Heartbeat(0, addrs, s0, token=7, timeout=timeout, interval=interval, on_timeout=a0)
    h1 = Heartbeat(1, addrs, s1, token=7, timeout=timeout, interval=interval, on_timeout=a1)
    return h0, h1, a0, a1


def test_beating_peers_stay_healthy() -> None:
    h0, h1, a0, a1 = _pair(timeout=1.0, interval=0.05)
    try:
        time.sleep(1.5)  # longer than the timeout: only beats keep it quiet
        assert not a0.fired.is_set() and not a1.fired.is_set()
        assert h0.health() is None and h1.health() is None
        assert max(h0.silent_for().values()) < 0.5
    finally:
        h0.close()
        h1.close()


def test_a_silent_rank_is_reported_then_ends_the_job_naming_it() -> None:
    s0, s1 = _socket(), _socket()  # rank 1 has a socket but never beats: a stopped process
    alarm = Alarm()
    t0 = time.monotonic()
    h0 = Heartbeat(0, [s0.getsockname(), s1.getsockname()], s0, token=1, timeout=2.0,
                   interval=0.05, on_timeout=alarm)
    try:
        time.sleep(1.7)  # past suspect_after (1.5 s), before the timeout
        reason = h0.health()
        assert reason is not None and reason.startswith("rank 1 has not answered heartbeats")
        assert alarm.fired.wait(3)
        elapsed = time.monotonic() - t0
    finally:
        h0.close()
        s1.close()
    assert 2.0 <= elapsed < 2.6
    assert alarm.messages == [alarm.messages[0]]
    assert "rank 0: rank 1 has sent no heartbeat for" in alarm.messages[0]
    assert "ending the job" in alarm.messages[0]


def test_a_worker_notices_a_silent_rank_0() -> None:
    s0, s1 = _socket(), _socket()
    alarm = Alarm()
    h1 = Heartbeat(1, [s0.getsockname(), s1.getsockname()], s1, token=1, timeout=0.5,
                   interval=0.05, on_timeout=alarm)
    try:
        assert alarm.fired.wait(3)
    finally:
        h1.close()
        s0.close()
    assert "rank 1: rank 0 has sent no heartbeat" in alarm.messages[0]


def test_a_rank_that_leaves_on_purpose_raises_no_alarm() -> None:
    h0, h1, a0, a1 = _pair(timeout=0.5, interval=0.05)
    time.sleep(0.2)
    h1.close()  # says goodbye
    time.sleep(1.0)
    try:
        assert not a0.fired.is_set()
        assert h0.health() is None
    finally:
        h0.close()


def test_datagrams_of_another_job_are_ignored() -> None:
    s0, s1 = _socket(), _socket()
    addrs = [s0.getsockname(), s1.getsockname()]
    alarm = Alarm()
    h0 = Heartbeat(0, addrs, s0, token=1, timeout=0.6, interval=0.05, on_timeout=alarm)
    other = Heartbeat(1, addrs, s1, token=2, timeout=60, interval=0.05, on_timeout=Alarm())
    try:
        assert alarm.fired.wait(3)  # rank 1 of *another* job beating does not count
    finally:
        h0.close()
        other.close()
