"""One HTTP request's generations: ``n`` engine sub-requests run concurrently, merged into one
event stream, and always aborted if the HTTP side stops listening."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from llama_mpi.mpi_server.engine.engine_api import AsyncEngineAPI, EngineDeadError, EngineFullError
from llama_mpi.mpi_server.engine.outputs import RequestOutput, TokenLogprob
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from llama_mpi.mpi_server.http.errors import APIError, from_value_error
from llama_mpi.mpi_server.http.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


def engine_error(exc: BaseException) -> APIError:
    """Map what ``engine.generate`` may raise to an HTTP error."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineFullError):
        return APIError(503, "Server is busy: the request queue is full; retry shortly",
                        type="server_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The inference engine is unavailable: {exc}", type="server_error",
                        code="engine_dead")
    if isinstance(exc, ValueError):
        return from_value_error(exc, "prompt")
    log.error("engine error", exc_info=exc)
    return APIError(500, f"Internal error: {type(exc).__name__}", type="server_error")


@dataclass
class Choice:
    """Everything generated so far for one choice (sub-request)."""

    index: int
    request_id: str
    t_submit: float = field(default_factory=time.perf_counter)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    t_first: float | None = None
    t_end: float | None = None
    final: RequestOutput | None = None

    def apply(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.new_token_ids and self.t_first is None:
            self.t_first = now
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens or len(self.token_ids)
        self.cached_tokens = out.cached_prompt_tokens or self.cached_tokens
        if out.finished:
            self.finished, self.final, self.t_end = True, out, now
            self.finish_reason = out.finish_reason or "stop"
            self.error = out.error or (
                "generation failed" if out.finish_reason == "error" else None)

    def ttft(self) -> float | None:
        if self.final is not None and self.final.time_to_first_token is not None:
            return self.final.time_to_first_token
        return None if self.t_first is None else self.t_first - self.t_submit

    def decode_seconds(self) -> float | None:
        if self.final is not None and self.final.decode_seconds is not None:
            return self.final.decode_seconds
        if self.t_first is None or self.t_end is None:
            return None
        return self.t_end - self.t_first

    def prompt_seconds(self) -> float | None:
        if self.final is not None and self.final.prompt_seconds is not None:
            return self.final.prompt_seconds
        return self.ttft()


class Generation:
    def __init__(
        self,
        engine: AsyncEngineAPI,
        metrics: Metrics,
        request_id: str,
        prompt_ids: list[int],
        params: list[SamplingParams],
        *,
        timed: bool = True,
    ) -> None:
        self.engine, self.metrics, self.timed = engine, metrics, timed
        self.prompt_ids = prompt_ids
        self.params = params
        many = len(params) > 1
        self.choices = [Choice(i, f"{request_id}-{i}" if many else request_id)
                        for i in range(len(params))]
        self._iters: list[AsyncIterator[RequestOutput] | None] = [None] * len(params)
        self._primed: list[RequestOutput | None] = [None] * len(params)
        self._pending: dict[asyncio.Task[RequestOutput], int] = {}

    async def _submit(self, i: int) -> None:
        choice = self.choices[i]
        choice.t_submit = time.perf_counter()
        it = self.engine.generate(choice.request_id, self.prompt_ids, self.params[i])
        self._iters[i] = it
        # The first step is where an async-generator engine actually queues the request, so
        # taking it here turns "queue full" / "bad prompt" into a proper status code.
        self._primed[i] = await it.__anext__()

    async def start(self) -> None:
        results = await asyncio.gather(*(self._submit(i) for i in range(len(self.choices))),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            if any(isinstance(e, StopAsyncIteration) for e in errors):
                raise APIError(500, "engine ended a request without output", type="server_error")
            raise engine_error(errors[0])

    def _record(self, i: int, out: RequestOutput) -> None:
        choice = self.choices[i]
        choice.apply(out)
        if out.finished:
            self.metrics.observe_finished(out, choice.ttft(), choice.decode_seconds(),
                                          timed=self.timed)

    async def events(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Outputs of all choices as they arrive (per-choice order kept)."""
        for i, out in enumerate(self._primed):
            if out is not None:
                self._primed[i] = None
                self._record(i, out)
                yield self.choices[i], out
        for i, choice in enumerate(self.choices):
            if not choice.finished:
                self._schedule(i)
        while self._pending:
            done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = self._pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    out = RequestOutput(self.choices[i].request_id, [], "", finished=True,
                                        finish_reason="abort")
                except Exception as exc:
                    raise engine_error(exc) from exc
                self._record(i, out)
                if not out.finished:
                    self._schedule(i)
                yield self.choices[i], out

    def _schedule(self, i: int) -> None:
        it = self._iters[i]
        assert it is not None
        task = asyncio.ensure_future(_next(it))
        self._pending[task] = i

    async def collect(self) -> list[Choice]:
        async for _ in self.events():
            pass
        return self.choices

    async def close(self) -> None:
        """Abort whatever has not finished. Shielded: it runs while the stream is cancelled."""
        for choice in self.choices:
            if not choice.finished:
                with contextlib.suppress(Exception):
                    self.engine.abort(choice.request_id)
        tasks = list(self._pending)
        self._pending.clear()
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            for it in self._iters:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(BaseException):
                        await aclose()


async def _next(it: AsyncIterator[RequestOutput]) -> RequestOutput:
    return await it.__anext__()


class ClientGone(Exception):
    """The client hung up before the answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it and raise ``ClientGone``."""
    task: asyncio.Future[Any] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await task
        watcher.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()
