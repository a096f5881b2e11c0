"""A client that goes away mid-request must abort the engine work (stream or not)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.mpi_server.fake_engine import FakeEngine, make_app

BODY = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True,
        "max_tokens": 10_000}


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/completion",
                                  "/generate_stream"])
def test_cancelled_request_aborts(path: str, stream: bool) -> None:
    if path == "/generate_stream" and not stream:
        path = "/generate"
    engine = FakeEngine(max_model_len=20_000, token_delay=0.01)
    app = make_app(engine)
    body = dict(BODY, stream=stream, prompt="hi", inputs="hi",
                parameters={"max_new_tokens": 10_000, "ignore_eos": True})

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            task = asyncio.create_task(client.post(path, json=body))
            for _ in range(500):
                await asyncio.sleep(0.01)
                if engine.running:
                    break
            await asyncio.sleep(0.05)  # some tokens have been produced
            assert engine.running, "request never started"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):  # cleanup runs on the cancelled task
                if not engine.running:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(scenario())
    (rid, _, _), = engine.calls
    assert not engine.running
    assert rid in engine.aborted
    assert rid in engine.closed_unfinished  # the engine's generator was closed too
