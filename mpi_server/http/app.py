"""Builds the FastAPI app: routes, error shapes, auth, metrics, and the shutdown hook."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST

from llama_mpi.mpi_server.engine.engine_api import AsyncEngineAPI
from llama_mpi.mpi_server.http import lightllm_routes, llamacpp_routes, openai_routes
from llama_mpi.mpi_server.http.auth import AuthMiddleware
from llama_mpi.mpi_server.http.errors import CatchAllMiddleware, install_error_handlers
from llama_mpi.mpi_server.http.limits import BodyLimitMiddleware
from llama_mpi.mpi_server.http.metrics import Metrics, RequestCounterMiddleware
from llama_mpi.mpi_server.http.state import ChatToIds, ServerState, get_state


def create_app(
    engine: AsyncEngineAPI | None,
    tokenizer: Any,
    chat_to_ids: ChatToIds | None,
    *,
    model_name: str,
    api_key: str | None,
    vocab_size: int,
    display_chat: bool = False,
    no_perf: bool = False,
    max_model_len: int,
    model_aliases: Sequence[str] = (),
    special: bool = False,
    ready: bool | None = None,
    max_request_bytes: int = 0,
    strict_model_name: bool = False,
    reasoning_format: str = "none",
) -> FastAPI:
    """The HTTP app. ``engine=None`` (or ``ready=False``) starts it in the "loading" state:
    ``/health`` answers 503 until :func:`attach_engine` installs the model.

    ``max_request_bytes``: larger request bodies get 413 before they are parsed; 0 means
    ``max(4 MiB, 64 * max_model_len)`` (``limits.auto_body_limit``), following the context
    length installed by :func:`attach_engine`. ``strict_model_name``: a request naming another
    model than this one (or an alias) gets OpenAI's 404; by default it is served, as llama.cpp
    serves its one model under any name. ``reasoning_format``: "deepseek" moves a leading
    ``<think>`` block of chat replies to ``reasoning_content``; "none" leaves it in ``content``.

    The app's lifespan shutdown stops taking requests and awaits ``engine.shutdown()``.
    """
    metrics = Metrics()
    state = ServerState(model_name=model_name, api_key=api_key or None, metrics=metrics,
                        display_chat=display_chat, no_perf=no_perf, special=special,
                        model_aliases=tuple(model_aliases), strict_model_name=strict_model_name,
                        max_request_bytes=max(int(max_request_bytes), 0),
                        reasoning_format=reasoning_format)
    if reasoning_format not in ("none", "deepseek"):
        raise ValueError(f"reasoning_format: {reasoning_format!r} is not 'none' or 'deepseek'")
    if engine is not None:
        if chat_to_ids is None:
            raise ValueError("create_app: an engine needs its chat_to_ids")
        state.attach(engine, tokenizer, chat_to_ids, vocab_size, max_model_len)
        state.ready = True if ready is None else ready
    else:
        state.vocab_size, state.max_model_len = vocab_size, max_model_len

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await state.shutdown()

    app = FastAPI(title="llama-mpi", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    routers = (openai_routes.router, llamacpp_routes.router, lightllm_routes.router)
    for router in routers:
        app.include_router(router)
    paths = frozenset({"/metrics"} | {r.path for router in routers for r in router.routes
                                       if isinstance(r, APIRoute)})

    @app.get("/metrics")
    async def metrics_endpoint(st: ServerState = Depends(get_state)) -> Response:
        return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # Added last = outermost: the counter sees every status, including 401s and crashes.
    # The body limit sits inside auth, so a client without the key cannot make us read a body.
    app.add_middleware(BodyLimitMiddleware, limit=state.body_limit)
    if state.api_key:
        app.add_middleware(AuthMiddleware, api_key=state.api_key)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(RequestCounterMiddleware, metrics=metrics, paths=paths)
    return app


def server_state(app: FastAPI) -> ServerState:
    return app.state.server


def attach_engine(
    app: FastAPI,
    engine: AsyncEngineAPI,
    tokenizer: Any,
    chat_to_ids: ChatToIds,
    vocab_size: int,
    max_model_len: int,
) -> None:
    """Install the loaded model into an app made with ``engine=None``; marks it ready."""
    server_state(app).attach(engine, tokenizer, chat_to_ids, vocab_size, max_model_len)
