"""``llama-server``: start HTTP at once, load the model in the background, serve, drain.

/health answers 503 {"status": "loading"} while the model loads, then 200. SIGINT/SIGTERM
refuse new requests (503), let the engine finish or cancel what runs, and exit 0.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from llama_mpi.mpi_server.config import ServerConfig
from llama_mpi.mpi_server.http import attach_engine, create_app, server_state
from llama_mpi.mpi_server.settings import http_options
from llama_mpi.parallel.startup import StartupError

log = logging.getLogger("llama_mpi.server")

DRAIN_SECONDS = 10.0  # engine.shutdown()'s default drain window
# Start-up failures whose message says it all (file, key, why): no traceback unless verbose.
OPERATOR_ERRORS = (ValueError, MemoryError, OSError, StartupError)


class _Server(uvicorn.Server):
    """uvicorn, plus: a signal starts draining at once, and is not re-raised at exit."""

    def __init__(self, config: uvicorn.Config, on_exit: Any) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown (so the process "dies of" them);
        # we drained on purpose and want exit status 0.
        self._captured_signals.clear()


def _settle(fut: asyncio.Future[Any], result: Any, exc: Exception | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _default_build(config: ServerConfig) -> Any:
    from llama_mpi.mpi_server.engine_factory import build_engine  # heavy: torch etc.

    return build_engine(config)


def _load_in_thread(config: Any, loop: asyncio.AbstractEventLoop,
                    build: Callable[[Any], Any]) -> asyncio.Future[Any]:
    """Run ``build_engine`` on a daemon thread: a slow load must not block the event loop,
    and an interrupted load must not keep the process alive at exit."""
    fut: asyncio.Future[Any] = loop.create_future()

    def work() -> None:
        try:
            result: Any = build(config)
        except Exception as exc:  # handed to the loop, which logs it and exits 1
            loop.call_soon_threadsafe(_settle, fut, None, exc)
            return
        loop.call_soon_threadsafe(_settle, fut, result, None)

    threading.Thread(target=work, name="model-loader", daemon=True).start()
    return fut


async def _serve(config: ServerConfig, build: Callable[[Any], Any] = _default_build) -> int:
    options = http_options(config)
    name = options["model_name"]
    app = create_app(None, None, None, vocab_size=0, **options)
    state = server_state(app)
    loop = asyncio.get_running_loop()
    uv_config = uvicorn.Config(
        app,
        host=config.hostname,
        port=config.port,
        lifespan="on",
        log_level="info",
        # Streams still open after the engine's drain window are cut, so exit stays bounded.
        timeout_graceful_shutdown=int(DRAIN_SECONDS) + 5,
    )
    # The signal handler runs between bytecodes; hop onto the loop before touching state.
    server = _Server(uv_config, lambda: loop.call_soon_threadsafe(state.begin_shutdown))
    failed = False

    async def load() -> None:
        nonlocal failed
        try:
            engine, tokenizer, chat_to_ids, vocab_size, max_model_len = await _load_in_thread(
                config, loop, build)
            start = getattr(engine, "start", None)  # engines that need the loop start here
            if start is not None and inspect.iscoroutinefunction(start):
                await start()
        except OPERATOR_ERRORS as exc:  # bad file, key, rank count or budget: one message
            log.error("model loading failed: %s", exc,
                      exc_info=exc if config.verbose else None)
            failed = True
            server.should_exit = True
            return
        except Exception:
            log.exception("model loading failed")
            failed = True
            server.should_exit = True
            return
        if state.draining:  # shut down while loading: do not start serving
            await engine.shutdown()
            return
        attach_engine(app, engine, tokenizer, chat_to_ids, vocab_size, max_model_len)
        log.info("model loaded: %s (context %d, vocab %d)", name, max_model_len, vocab_size)

    loader = asyncio.create_task(load())
    try:
        await server.serve()
    finally:
        if not loader.done():
            loader.cancel()
        await state.shutdown()  # idempotent; covers a model that finished loading late
    return 1 if failed else 0


def configure(prog: str, argv: list[str] | None) -> Any | None:
    """Logging plus the configuration from file and flags; None (after printing why) if bad."""
    from llama_mpi.mpi_server.config import ConfigError, load_config

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or "-v" in args
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(None, args)
    except ConfigError as exc:
        if _is_rank0():  # every rank parses the same file: say it once per job
            print(f"{prog}: {exc}", file=sys.stderr)
        return None
    if config.verbose and not verbose:  # set in the file: raise the level now
        logging.getLogger().setLevel(logging.DEBUG)
    return config


def _is_rank0() -> bool:
    from llama_mpi.parallel.abort import world_rank

    return world_rank() == 0


def main(argv: list[str] | None = None) -> int:
    config = configure("llama-server", argv)
    return 2 if config is None else serve(config)


def serve(config: ServerConfig, build: Callable[[Any], Any] = _default_build) -> int:
    """Serve HTTP for ``config``; ``build(config)`` returns what ``build_engine`` returns."""
    return asyncio.run(_serve(config, build))


if __name__ == "__main__":
    sys.exit(main())
