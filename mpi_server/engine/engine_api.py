"""The engine as the HTTP layer sees it: submit, stream, abort, inspect."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llama_mpi.mpi_server.engine.outputs import RequestOutput
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams


class EngineFullError(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine loop (or a rank behind it) has failed; nothing more can be served."""


@dataclass
class SlotInfo:
    id: int
    request_id: str | None
    state: str  # "idle" | "prefill" | "decode"
    n_prompt_tokens: int
    n_generated: int


@dataclass
class EngineStats:
    queue_length: int
    running: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_hits: int  # prompt tokens served from cache, cumulative
    prefix_cache_queries: int  # prompt tokens looked up, cumulative
    # structured outputs, cumulative: tokens sampled under a grammar, the steps (schedule to
    # outputs) that sampled at least one, and the time of their masks and accepts
    constrained_tokens: int = 0
    constrained_step_seconds: float = 0.0
    grammar_seconds: float = 0.0


class AsyncEngineAPI(ABC):
    max_model_len: int

    @abstractmethod
    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs until one has ``finished``. Cancelling the iterator aborts the request.

        Raises ``ValueError`` for a prompt the engine cannot take (e.g. longer than the
        context), ``EngineFullError`` when the queue is full, ``EngineDeadError`` when dead.
        """

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def slots(self) -> list[SlotInfo]: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    def health(self) -> str | None:
        """None while requests can be served, else why not (``/health`` answers 503 with it)."""
        return None

    @abstractmethod
    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Stop taking requests, finish or cancel what runs, release the executor."""
