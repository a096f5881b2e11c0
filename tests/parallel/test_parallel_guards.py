"""In-process checks of the watchdog, run_guarded and the single-process communicator."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from llama_mpi.parallel.communicator import SingleProcessCommunicator, make_communicator
from llama_mpi.parallel.guard import install_sigterm_handler, run_guarded
from llama_mpi.parallel.watchdog import CollectiveWatchdog


def test_watchdog_fires_with_op_name_after_deadline():
    fired: list[str] = []
    done = threading.Event()
    wd = CollectiveWatchdog(3, timeout=0.2, on_timeout=lambda m: (fired.append(m), done.set()))
    wd.begin("all_to_all")
    assert done.wait(5)
    wd.close()
    assert fired == ["rank 3: collective all_to_all exceeded 0.2 s; aborting the job"]


def test_watchdog_quiet_when_collectives_finish_in_time():
    fired: list[str] = []
    wd = CollectiveWatchdog(0, timeout=0.2, on_timeout=fired.append)
    for _ in range(1000):
        wd.begin("all_reduce")
        wd.end()
    threading.Event().wait(0.4)
    wd.close()
    assert fired == []


def test_run_guarded_passes_clean_exit_through():
    def leave() -> None:
        raise SystemExit(0)

    with pytest.raises(SystemExit):
        run_guarded(leave)


def test_run_guarded_returns_value():
    assert run_guarded(lambda a, b=0: a + b, 2, b=3) == 5


def test_world_of_one_without_mpi_is_single_process():
    assert isinstance(make_communicator("auto", "cpu", mpi_comm=None), SingleProcessCommunicator)


def test_single_process_collectives_are_identity():
    comm = SingleProcessCommunicator()
    t = torch.arange(6.0).reshape(3, 2)
    assert comm.all_reduce(t) is t
    assert torch.equal(comm.all_gather(t, dim=1), t)
    out, counts = comm.all_to_all(t, [3])
    assert torch.equal(out, t) and counts == [3]
    assert comm.broadcast_object({"a": 1}) == {"a": 1}


def test_all_to_all_rejects_counts_not_matching_rows():
    with pytest.raises(ValueError, match="send_counts"):
        SingleProcessCommunicator().all_to_all(torch.zeros(4, 8), [3])


def test_sigterm_handler_calls_callback_first():
    calls: list[int] = []
    old = signal.getsignal(signal.SIGTERM)
    try:
        install_sigterm_handler(lambda: calls.append(1))
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [1]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_gloo_world_of_one_needs_no_mpi():
    comm = make_communicator("gloo", "cpu", mpi_comm=None, timeout=10)
    try:
        out, counts = comm.all_to_all(torch.arange(16.0).reshape(2, 8), [2])
        assert counts == [2] and out.shape == (2, 8)
        assert torch.equal(comm.all_reduce(torch.ones(3, dtype=torch.bfloat16)), torch.ones(3))
    finally:
        comm.close()
