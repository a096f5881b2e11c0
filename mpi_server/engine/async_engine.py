"""The engine behind asyncio: one background thread steps it, requests stream through queues.

The step runs in a plain thread because the model call releases the GIL (torch), so the
event loop keeps serving HTTP meanwhile. Submissions and aborts from the loop are handed to
the thread as pending work and applied between steps (an abort is applied at once when no
step is running); outputs go back via ``loop.call_soon_threadsafe`` into one
``asyncio.Queue`` per request. With nothing to do the thread sleeps on a condition variable.

Waking from idle, the thread lets a burst of arrivals finish (``batch_wait_s`` without a new
request, at most ten times that) so that prompts sent together are prefilled in one step:
a prompt that just misses the first step otherwise waits for that whole step (seconds for a
big prefill) and then takes a step of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llama_mpi.mpi_server.engine.engine import Engine
from llama_mpi.mpi_server.engine.engine_api import (
    AsyncEngineAPI,
    EngineDeadError,
    EngineFullError,
    EngineStats,
    SlotInfo,
)
from llama_mpi.mpi_server.engine.outputs import RequestOutput
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]


def _final(request_id: str, reason: str, error: str | None = None) -> RequestOutput:
    return RequestOutput(request_id, [], "", finished=True, finish_reason=reason, error=error)


class AsyncEngine(AsyncEngineAPI):
    def __init__(self, engine: Engine, batch_wait_s: float = 0.0,
                 step_timeout_s: float = 120.0) -> None:
        if not (0.0 <= batch_wait_s <= 10.0 and 0.0 < step_timeout_s < float("inf")):
            raise ValueError(f"batch_wait_s {batch_wait_s} / step_timeout_s {step_timeout_s}")
        self.engine = engine
        self.batch_wait_s = batch_wait_s
        self.step_timeout_s = step_timeout_s
        self._step_started: float | None = None  # monotonic start of the running step
        self.max_model_len = engine.max_model_len
        self._cv = threading.Condition()  # guards the fields below
        self._streams: dict[str, _Stream] = {}
        self._pending_adds: list[tuple[str, list[int], SamplingParams]] = []
        self._pending_aborts: set[str] = set()
        self._stop = False
        self._accepting = True
        self._dead: Exception | None = None
        self._step_lock = threading.Lock()  # held by the thread while it touches the engine
        # What the event loop may read about the engine: taken with the step lock held (the
        # engine consistent), published under the condition; never the live engine state.
        self._view = self._take_view()
        self._thread = threading.Thread(target=self._run, name="llama-mpi-engine", daemon=True)
        self._thread.start()

    # -- the API ------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Errors (``ValueError``, ``EngineFullError``, ``EngineDeadError``) raise on the first
        ``__anext__``, before any output."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._submit(request_id, prompt_ids, params, stream)
        finished = False
        try:
            while not finished:
                out = await stream.queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:  # cancelled or closed early: the client has gone
                self._abort(request_id)

    def abort(self, request_id: str) -> None:
        stream = self._abort(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, _final(request_id, "abort"))

    def slots(self) -> list[SlotInfo]:
        with self._cv:
            return list(self._view[0])

    def stats(self) -> EngineStats:
        with self._cv:
            stats = dataclasses.replace(self._view[1])
            stats.queue_length += len(self._pending_adds)
        return stats

    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self._streams and self._dead is None and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for rid in list(self._streams):
            self.abort(rid)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        await asyncio.to_thread(self._thread.join)
        with self._step_lock:  # apply aborts the thread did not get to
            for rid in self._pending_aborts:
                self.engine.abort(rid)
            self._pending_aborts.clear()
        self.engine.executor.shutdown()

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def health(self) -> str | None:
        if self._dead is not None:
            return f"the inference engine has failed: {self._dead}"
        if not self._thread.is_alive() and not self._stop:
            return "the inference engine thread has stopped"
        started = self._step_started
        if started is not None:
            running = time.monotonic() - started
            if running > self.step_timeout_s:
                return (f"a step has been running for {running:.1f} s (limit "
                        f"{self.step_timeout_s:g} s): a rank or collective may be hung")
        return self.engine.executor.health()

    # -- event-loop side ----------------------------------------------------------------------

    def _submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, stream: _Stream
    ) -> None:
        self.engine.check_request(prompt_ids, params)  # pure validation, safe off-thread
        with self._cv:
            if self._dead is not None:
                raise EngineDeadError(f"the engine has failed: {self._dead!r}")
            if not self._accepting:
                raise EngineDeadError("the engine is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            if self._full(extra=len(self._pending_adds)):
                raise EngineFullError("the queue is full; retry later")
            self._streams[request_id] = stream
            self._pending_adds.append((request_id, list(prompt_ids), params))
            self._cv.notify()

    def _abort(self, request_id: str) -> _Stream | None:
        """Forget the request's stream and drop it from the engine (now, or after the step)."""
        with self._cv:
            stream = self._streams.pop(request_id, None)
            before = len(self._pending_adds)
            self._pending_adds = [a for a in self._pending_adds if a[0] != request_id]
            if len(self._pending_adds) != before or self._dead is not None:
                return stream
            if self._step_lock.acquire(blocking=False):
                try:
                    self.engine.abort(request_id)
                    self._view = self._take_view()
                finally:
                    self._step_lock.release()
            else:
                self._pending_aborts.add(request_id)
                self._cv.notify()
        return stream

    # -- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - outside a step (a bug): still fail loudly
            log.exception("engine thread failed; failing every pending request")
            self._fail(exc)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (
                    self._stop
                    or self._pending_adds
                    or self._pending_aborts
                    or self.engine.has_unfinished()
                ):
                    self._cv.wait()
                if self._stop:
                    return
                if self._pending_adds and not self.engine.has_unfinished():
                    self._await_burst()
                adds, self._pending_adds = self._pending_adds, []
                aborts, self._pending_aborts = self._pending_aborts, set()
                # Hold the step lock before letting go of the condition, so that an abort
                # arriving now is queued rather than applied mid-step.
                self._step_lock.acquire()
            self._step_started = time.monotonic()
            try:
                outputs = self._apply(adds, aborts)
                outputs += self.engine.step()
                view = self._take_view()
            except Exception as exc:  # any failure (a rank, the model, a bug) kills the engine
                log.exception("engine step failed; failing every pending request")
                self._fail(exc)
                return
            finally:
                self._step_started = None
                self._step_lock.release()
            with self._cv:
                self._view = view
            self._deliver(outputs)
            if self.engine.last_num_tokens == 0 and self.engine.has_unfinished():
                with self._cv:  # nothing could run (should not happen): do not spin
                    self._cv.wait(timeout=0.01)

    def _take_view(self) -> tuple[list[SlotInfo], EngineStats]:
        """With the step lock held (or before the thread starts)."""
        return self.engine.slots(), self.engine.stats()

    def _full(self, extra: int) -> bool:
        """With the condition held: would ``extra`` more submissions overflow the queue?
        The scheduler's rule on the published view (the engine may be mid-step)."""
        stats, sched = self._view[1], self.engine.scheduler
        free_slots = sched.n_parallel - stats.running
        return stats.queue_length + extra >= sched.max_queue + free_slots

    def _await_burst(self) -> None:
        """With the condition held: wait while requests keep arriving (see the module doc)."""
        gap = self.batch_wait_s
        deadline = time.monotonic() + 10 * gap
        seen = len(self._pending_adds)
        while gap > 0 and not self._stop and time.monotonic() < deadline:
            self._cv.wait(timeout=min(gap, deadline - time.monotonic()))
            if len(self._pending_adds) == seen:
                return
            seen = len(self._pending_adds)

    def _apply(self, adds: list, aborts: set[str]) -> list[RequestOutput]:
        outputs = []
        for rid in aborts:
            self.engine.abort(rid)
        for rid, prompt_ids, params in adds:
            try:
                self.engine.add_request(rid, prompt_ids, params, checked=True)  # in _submit
            except (ValueError, EngineFullError) as exc:  # raced past the loop-side checks
                outputs.append(_final(rid, "error", error=str(exc)))
        return outputs

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._cv:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:  # aborted meanwhile
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                try:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
                except RuntimeError:  # that event loop is closed
                    log.warning("dropping output for %s: its event loop is closed", out.request_id)

    def _fail(self, exc: Exception) -> None:
        with self._cv:
            self._dead = exc
            rids = list(self._streams)
            self._pending_adds.clear()
        self._deliver([_final(rid, "error", error=f"engine failed: {exc!r}") for rid in rids])
