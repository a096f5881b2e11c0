"""The all-to-all dispatcher with N ranks simulated in one process (a thread per rank over a
fake communicator): the ranks' partial sums add up to every expert run in one place."""

from __future__ import annotations

import threading

import pytest
import torch

from llama_mpi.moe.dispatcher import LocalDispatcher
from llama_mpi.moe.ep_dispatchers import AllReduceDispatcher, AllToAllDispatcher
from llama_mpi.moe.experts import FusedExperts
from llama_mpi.parallel.communicator import Communicator


class ThreadWorld:
    """Mailboxes and a barrier shared by the fake ranks."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=10)
        self.mail: list[list[torch.Tensor | None]] = [[None] * n for _ in range(n)]


class FakeComm(Communicator):
    """Only ``all_to_all`` is real (what the dispatcher uses); the rest is not needed."""

    def __init__(self, rank: int, world: ThreadWorld) -> None:
        super().__init__(rank, world.n, None)
        self.world = world

    def _all_to_all(self, t, send_counts, recv_counts):
        w, r = self.world, self.rank
        for dst, chunk in enumerate(torch.split(t, send_counts)):
            w.mail[r][dst] = chunk.clone()
        w.barrier.wait()
        got = [w.mail[src][r] for src in range(w.n)]
        w.barrier.wait()  # everyone has read before the next exchange writes
        counts = [g.shape[0] for g in got]
        if recv_counts is not None:
            assert counts == recv_counts
        return torch.cat(got), counts

    def _unused(self, *args):
        raise NotImplementedError

    _all_reduce = _all_gather = _broadcast_object = _broadcast = _barrier = _unused


def _experts(n_experts: int, hidden: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(n_experts, 2 * width, hidden, generator=g) * 0.1
    down = torch.randn(n_experts, hidden, width, generator=g) * 0.1
    return gate_up, down


def _run_ranks(n: int, fn):
    results: list = [None] * n
    errors: list[BaseException] = []

    def target(r: int) -> None:
        try:
            results[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("n_ranks,n_tokens", [(2, 7), (4, 5), (4, 1), (2, 40)])
def test_rank_partials_add_up_to_the_one_process_sum(n_ranks, n_tokens) -> None:
    n_experts, hidden, width, k = 8, 32, 16, 3
    gate_up, down = _experts(n_experts, hidden, width, seed=n_tokens)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, k, generator=g)
    want = LocalDispatcher()(x, ids, weights, FusedExperts(gate_up, down, 0))
    per = n_experts // n_ranks
    world = ThreadWorld(n_ranks)

    def rank(r: int) -> torch.Tensor:
        mine = FusedExperts(gate_up[r * per:(r + 1) * per], down[r * per:(r + 1) * per],
                            r * per)
        return AllToAllDispatcher(FakeComm(r, world), n_experts)(x, ids, weights, mine)

    partials = _run_ranks(n_ranks, rank)
    torch.testing.assert_close(sum(partials), want, rtol=1e-5, atol=1e-6)
    shares = [AllToAllDispatcher(FakeComm(r, world), n_experts).token_share(n_tokens)
              for r in range(n_ranks)]
    for r, (lo, hi) in enumerate(shares):  # each rank fills only its own share's rows
        assert not partials[r][:lo].any() and not partials[r][hi:].any()
    assert [s[1] - s[0] for s in shares] == [len(range(n_tokens)[r::n_ranks])
                                              for r in range(n_ranks)]


def test_all_reduce_dispatcher_is_a_partial_of_the_local_call() -> None:
    gate_up, down = _experts(4, 32, 16, seed=0)
    x = torch.randn(3, 32)
    ids = torch.tensor([[0, 3], [1, 2], [3, 1]])
    weights = torch.rand(3, 2)
    halves = [AllReduceDispatcher()(x, ids, weights, FusedExperts(gate_up[i:i + 2],
                                                                  down[i:i + 2], i))
              for i in (0, 2)]
    whole = LocalDispatcher()(x, ids, weights, FusedExperts(gate_up, down, 0))
    torch.testing.assert_close(halves[0] + halves[1], whole)
    assert AllReduceDispatcher.complete is False and LocalDispatcher.complete is True
