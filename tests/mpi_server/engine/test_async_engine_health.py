"""``AsyncEngine.health()``: what ``/health`` reports about the engine behind it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from llama_mpi.mpi_server.engine.async_engine import AsyncEngine
from llama_mpi.mpi_server.engine.engine_api import EngineDeadError
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from tests.mpi_server.fakes import FakeExecutor, make_engine

EOS = 1


class BlockingExecutor(FakeExecutor):
    """Its second step blocks until released: a rank that stopped answering."""

    def __init__(self) -> None:
        super().__init__(banned=(EOS,))
        self.release = threading.Event()
        self.blocked = threading.Event()

    def execute(self, batch):
        if self.calls == 1:
            self.blocked.set()
            self.release.wait(10)
        return super().execute(batch)


async def _drain(it) -> list:
    return [out async for out in it]


def test_a_healthy_idle_engine_reports_nothing() -> None:
    async def main():
        eng = AsyncEngine(make_engine(FakeExecutor()))
        try:
            assert eng.health() is None
        finally:
            await eng.shutdown()

    asyncio.run(main())


def test_a_step_running_past_the_bound_is_reported_then_clears() -> None:
    async def main():
        ex = BlockingExecutor()
        eng = AsyncEngine(make_engine(ex), step_timeout_s=0.2)
        task = asyncio.create_task(_drain(eng.generate("r", [2, 3], SamplingParams(max_tokens=4))))
        await asyncio.to_thread(ex.blocked.wait, 5)
        await asyncio.sleep(0.35)
        reason = eng.health()
        ex.release.set()
        outs = await task
        after = eng.health()
        await eng.shutdown()
        return reason, outs, after

    reason, outs, after = asyncio.run(main())
    assert reason is not None and "a step has been running for" in reason
    assert "may be hung" in reason
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert after is None


def test_the_executor_reason_is_reported() -> None:
    async def main():
        ex = FakeExecutor()
        ex.health = lambda: "rank 1 has not answered heartbeats for 2.0 s"
        eng = AsyncEngine(make_engine(ex))
        try:
            return eng.health()
        finally:
            await eng.shutdown()

    assert asyncio.run(main()) == "rank 1 has not answered heartbeats for 2.0 s"


def test_a_failure_outside_a_step_kills_the_engine_loudly_not_silently() -> None:
    """Once, an infinite ``batch_wait_ms`` made the thread die between steps: every request
    then hung while /health said 200. Any failure of the thread must fail the requests."""

    async def main():
        eng = AsyncEngine(make_engine(FakeExecutor()), batch_wait_s=0.01)

        def broken() -> None:
            raise OverflowError("timeout value is too large")

        eng._await_burst = broken
        t0 = time.monotonic()
        outs = await asyncio.wait_for(
            _drain(eng.generate("r", [2, 3], SamplingParams(max_tokens=4))), 5)
        elapsed = time.monotonic() - t0
        reason = eng.health()
        with pytest.raises(EngineDeadError):
            await eng.generate("late", [2], SamplingParams()).__anext__()
        await eng.shutdown(drain_timeout=0.1)
        return outs, elapsed, reason

    outs, elapsed, reason = asyncio.run(main())
    assert elapsed < 5
    assert outs[-1].finished and outs[-1].finish_reason == "error"
    assert "OverflowError" in outs[-1].error
    assert reason is not None and "has failed" in reason


def test_out_of_range_waits_are_refused() -> None:
    with pytest.raises(ValueError):
        AsyncEngine(make_engine(FakeExecutor()), batch_wait_s=float("inf"))


def test_slots_and_stats_come_from_the_published_view_not_the_live_engine() -> None:
    """The event loop never reads the scheduler while a step may be changing it."""

    async def main():
        ex = BlockingExecutor()
        eng = AsyncEngine(make_engine(ex, n_parallel=2))
        task = asyncio.create_task(_drain(eng.generate("r", [2, 3], SamplingParams(max_tokens=4))))
        await asyncio.to_thread(ex.blocked.wait, 5)  # mid-step: the live engine is busy
        live = eng.engine.slots, eng.engine.stats
        eng.engine.slots = eng.engine.stats = None  # any live read would now fail
        try:
            running, busy = eng.stats().running, [s.state for s in eng.slots()]
        finally:
            eng.engine.slots, eng.engine.stats = live
            ex.release.set()
        outs = await task
        await eng.shutdown()
        return running, busy, outs[-1]

    running, busy, last = asyncio.run(main())
    assert running == 1 and busy.count("idle") == 1
    assert last.finish_reason == "length"
