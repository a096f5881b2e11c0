"""What every route shares: the engine (once loaded), the tokenizer, flags and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from llama_mpi.mpi_server.engine.engine_api import AsyncEngineAPI
from llama_mpi.mpi_server.http.errors import APIError, printable
from llama_mpi.mpi_server.http.limits import auto_body_limit
from llama_mpi.mpi_server.http.metrics import Metrics

log = logging.getLogger(__name__)

ChatToIds = Callable[[list[dict[str, Any]]], list[int]]
T = TypeVar("T")

# Tokenizing and detokenizing run here, off the event loop. Few threads: the tokenizer
# serializes its calls anyway, and a queued job whose client has left is dropped unstarted.
TOKENIZER_THREADS = 2


@dataclass
class ServerState:
    model_name: str
    api_key: str | None
    metrics: Metrics
    display_chat: bool = False
    no_perf: bool = False
    special: bool = False  # render special tokens in output text (llama.cpp --special)
    model_aliases: tuple[str, ...] = ()  # other names accepted in "model" (e.g. the GGUF file)
    strict_model_name: bool = False  # 404 for an unknown "model" (OpenAI) instead of serving it
    max_request_bytes: int = 0  # request body limit; 0: auto_body_limit(max_model_len)
    reasoning_format: str = "none"  # "deepseek": <think> text goes to reasoning_content
    engine: AsyncEngineAPI | None = None
    tokenizer: Any = None
    chat_to_ids: ChatToIds | None = None
    vocab_size: int = 0
    max_model_len: int = 0
    ready: bool = False
    draining: bool = False
    # structured outputs, from the model's chat encoder (engine_factory.ChatEncoder)
    compiler: Any = None  # structured.GrammarCompiler, or None (built on first use if it can)
    tool_syntax: str | None = None  # "v3" | "v31": the chat template renders tool calls
    _shutdown: asyncio.Task[None] | None = field(default=None, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

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
        self.compiler = getattr(chat_to_ids, "compiler", None)
        self.tool_syntax = getattr(chat_to_ids, "tool_syntax", None)
        self.metrics.bind_engine(engine)
        self.ready = True

    def body_limit(self) -> int:
        """Bytes a request body may have (follows ``max_model_len`` once the model loads)."""
        return self.max_request_bytes or auto_body_limit(self.max_model_len)

    def require_engine(self) -> AsyncEngineAPI:
        if self.draining:
            raise APIError(503, "Server is shutting down", code="shutting_down")
        if not self.ready or self.engine is None:
            raise APIError(503, "Loading model", code="model_loading")
        return self.engine

    def engine_health(self) -> str | None:
        """None while the engine can serve, else why not (``engine.health()``, when it has it)."""
        probe = getattr(self.engine, "health", None)
        if probe is None:
            return None
        try:
            reason = probe()
        except Exception as exc:  # noqa: BLE001 - a failing probe is itself a reason
            log.exception("engine health check failed")
            return f"the engine health check failed: {type(exc).__name__}: {exc}"
        return printable(str(reason)) if reason else None

    def live_engine(self) -> AsyncEngineAPI:
        """The engine for a generating route: 503 ``engine_dead`` at once if it cannot serve."""
        engine = self.require_engine()
        reason = self.engine_health()
        if reason is not None:
            raise APIError(503, f"The inference engine is unavailable: {reason}",
                           type="server_error", code="engine_dead")
        return engine

    def grammar_compiler(self) -> Any:
        """The model's grammar compiler; 400 if this vocabulary cannot take constraints."""
        if self.compiler is None:
            from llama_mpi.models.tokenizer.tokenizer import Tokenizer

            if isinstance(self.tokenizer, Tokenizer):
                from llama_mpi.mpi_server.structured import compiler_for

                try:
                    self.compiler = compiler_for(self.tokenizer)
                except ValueError as exc:
                    raise APIError(400, f"Structured outputs are unavailable for this model: "
                                   f"{exc}") from exc
            else:
                raise APIError(400, "Structured outputs are unavailable for this model")
        return self.compiler

    def check_model(self, model: str | None) -> None:
        """Any name is served (as llama.cpp does) unless ``strict_model_name``."""
        if not model or model == self.model_name or model in self.model_aliases:
            return
        if not self.strict_model_name:
            log.debug("request names model %r; serving %r", model, self.model_name)
            return
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the tokenizer threads. Cancelled (the client left) before it starts,
        it never runs; once running it cannot be stopped, but its result is dropped."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenizer")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

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
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def get_state(request: Request) -> ServerState:
    return request.app.state.server
