from __future__ import annotations

import pytest

from llama_mpi.mpi_server.engine.block_manager import BlockManager
from llama_mpi.mpi_server.engine.engine_api import EngineFullError
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from llama_mpi.mpi_server.engine.scheduler import ScheduledSeq, Scheduler
from llama_mpi.mpi_server.engine.sequence import Sequence, SequenceStatus
from tests.mpi_server.fakes import FakeDetokenizer, FakeTokenizer


def seq(rid: str, n: int, start: int = 2) -> Sequence:
    tokens = [start + i % 50 for i in range(n)]
    return Sequence(rid, tokens, SamplingParams(), FakeDetokenizer(FakeTokenizer()))


def make(num_blocks=16, block_size=4, **kw) -> Scheduler:
    args = dict(n_parallel=2, n_batch=8, max_model_len=num_blocks * block_size, max_queue=4)
    args.update(kw)
    return Scheduler(BlockManager(num_blocks, block_size), **args)


def run_step(s: Scheduler) -> list[ScheduledSeq]:
    """Schedule, pretend the model ran, and 'sample' token 7 where a sequence is complete."""
    out = s.schedule()
    s.postprocess(out)
    for x in out:
        if x.seq.num_uncomputed == 0:
            x.seq.append_token(7)
    return out


def test_chunked_prefill_respects_n_batch() -> None:
    s = make(n_batch=5)
    a = seq("a", 12)
    s.add(a)
    chunks = [[(x.seq.request_id, x.num_new_tokens) for x in run_step(s)] for _ in range(4)]
    assert chunks == [[("a", 5)], [("a", 5)], [("a", 2)], [("a", 1)]]  # last: a decode
    assert a.num_cached == 13 and a.num_output_tokens == 2


def test_decodes_first_then_prefill_of_newcomers() -> None:
    s = make(n_batch=6)
    a, b = seq("a", 3), seq("b", 10)
    s.add(a)
    run_step(s)  # a prefilled, sampled
    s.add(b)
    step = [(x.seq.request_id, x.num_new_tokens) for x in run_step(s)]
    assert step == [("a", 1), ("b", 5)]
    assert [x.request_id if x else None for x in s.slots] == ["a", "b"]


def test_slots_bound_running_and_cont_batching_off_waits_for_empty_batch() -> None:
    s = make(n_parallel=2, cont_batching=False)
    a, b, c = seq("a", 2), seq("b", 2), seq("c", 2)
    for x in (a, b):
        s.add(x)
    run_step(s)
    s.add(c)
    run_step(s)
    assert c.status is SequenceStatus.WAITING  # a and b still run
    s.finish(a, "stop")
    run_step(s)
    assert c.status is SequenceStatus.WAITING  # a slot is free, but the batch is not empty
    s.finish(b, "stop")
    run_step(s)
    assert c.status is SequenceStatus.RUNNING


def test_cont_batching_admits_into_free_slot() -> None:
    s = make(n_parallel=2)
    a, b, c = seq("a", 2), seq("b", 2), seq("c", 2)
    for x in (a, b, c):
        s.add(x)
    run_step(s)
    assert c.status is SequenceStatus.WAITING
    s.finish(a, "stop")
    assert a.block_table == [] and s.slots[0] is None
    run_step(s)
    assert c.status is SequenceStatus.RUNNING and c.slot == 0


def test_pool_exhaustion_preempts_most_recent_and_recomputes() -> None:
    s = make(num_blocks=4, block_size=2, n_batch=16, max_model_len=8)
    a, b = seq("a", 3), seq("b", 3, start=30)
    s.add(a)
    run_step(s)
    s.add(b)
    run_step(s)  # a: 4 tokens (2 blocks), b: 4 tokens (2 blocks): pool full
    assert s.bm.num_free_blocks == 0
    out = run_step(s)  # a needs a third block: b (started last) is preempted
    assert [x.seq.request_id for x in out] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and s.waiting[0] is b
    assert b.num_output_tokens == 1 and s.num_preemptions == 1
    s.finish(a, "length")
    out = run_step(s)  # b comes back: its first block from the prefix cache, the rest recomputed
    assert [(x.seq.request_id, x.num_new_tokens) for x in out] == [("b", 2)]
    assert b.num_output_tokens == 2 and b.num_cached_prompt == 0


def test_waiting_request_waits_when_pool_is_short() -> None:
    s = make(num_blocks=3, block_size=2, n_batch=16, max_model_len=6)
    a, b = seq("a", 5), seq("b", 5, start=30)
    s.add(a)
    run_step(s)
    s.add(b)
    run_step(s)
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert s.num_preemptions == 0


def test_prompt_too_long_and_queue_full() -> None:
    s = make(num_blocks=4, block_size=4, n_parallel=1, max_queue=1)
    with pytest.raises(ValueError, match="prompt has 16 tokens; the context holds 16"):
        s.check_prompt(16)  # what Engine.check_request asks before anything is queued
    with pytest.raises(ValueError, match="empty"):
        s.check_prompt(0)
    with pytest.raises(AssertionError):  # add only asserts: the check happened at the edge
        s.add(seq("long", 16))
    s.add(seq("a", 4))  # takes the free slot's share
    s.add(seq("b", 4))  # the one queue place
    with pytest.raises(EngineFullError):
        s.add(seq("c", 4))
