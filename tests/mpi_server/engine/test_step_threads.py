"""``StepThreads``: decode steps on ``n_threads``, steps with prefill on ``n_threads_batch``,
the same rule on every rank."""

from __future__ import annotations

import torch

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.mpi_server.engine.local_executor import StepThreads


def test_prefill_and_decode_steps_get_their_thread_counts() -> None:
    before = torch.get_num_threads()
    try:
        threads = StepThreads(n_threads=1, n_threads_batch=2)
        threads.apply(ForwardBatch.build([([5, 6, 7], 0, [0])], 4))  # a prefill chunk
        assert torch.get_num_threads() == 2
        threads.apply(ForwardBatch.build([([8], 3, [0])], 4))  # one decode token
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_unset_counts_follow_the_process() -> None:
    threads = StepThreads()
    assert threads.decode == torch.get_num_threads() == threads.prefill
