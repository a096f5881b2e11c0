"""What every route shares: the engine (once loaded), the tokenizer, flags and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from llama_mpi.mpi_server.engine_api import AsyncEngineAPI
from llama_mpi.mpi_server.http.errors import APIError
from llama_mpi.mpi_server.http.metrics import Metrics

log = logging.getLogger(__name__)

ChatToIds = Callable[[list[dict[str, Any]]], list[int]]


@dataclass
class ServerState:
    model_name: str
    api_key: str | None
    metrics: Metrics
    display_chat: bool = False
    no_perf: bool = False
    special: bool = False  # render special tokens in output text (llama.cpp --special)
    model_aliases: tuple[str, ...] = ()  # other names accepted in "model" (e.g. the GGUF file)
    engine: AsyncEngineAPI | None = None
    tokenizer: Any = None
    chat_to_ids: ChatToIds | None = None
    vocab_size: int = 0
    max_model_len: int = 0
    ready: bool = False
    draining: bool = False
    _shutdown: asyncio.Task[None] | None = field(default=None, repr=False)

    def attach(
        self,
        engine: AsyncEngineAPI,
        tokenizer: Any,
        chat_to_ids: ChatToIds,
        vocab_size: int,
        max_model_len: int,
    ) -> None:
        """Install a loaded model and start serving (``/health`` turns 200)."""
        self.engine, self.tokenizer, self.chat_to_ids = engine, tokenizer, chat_to_ids
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.metrics.bind_engine(engine)
        self.ready = True

    def require_engine(self) -> AsyncEngineAPI:
        if self.draining:
            raise APIError(503, "Server is shutting down", code="shutting_down")
        if not self.ready or self.engine is None:
            raise APIError(503, "Loading model", code="model_loading")
        return self.engine

    def check_model(self, model: str | None) -> None:
        if not model or model == self.model_name or model in self.model_aliases:
            return
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )

    def begin_shutdown(self) -> asyncio.Task[None] | None:
        """Refuse new requests and start ``engine.shutdown()`` once; safe to call repeatedly."""
        self.draining = True
        if self._shutdown is None and self.engine is not None:
            self._shutdown = asyncio.get_running_loop().create_task(self._stop_engine())
        return self._shutdown

    async def _stop_engine(self) -> None:
        assert self.engine is not None
        try:
            await self.engine.shutdown()
        except Exception:  # noqa: BLE001 - shutdown must finish even if the engine is broken
            log.exception("engine shutdown failed")

    async def shutdown(self) -> None:
        task = self.begin_shutdown()
        if task is not None:
            await task


def get_state(request: Request) -> ServerState:
    return request.app.state.server
