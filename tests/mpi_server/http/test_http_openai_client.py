"""The official ``openai`` client against a real uvicorn server running the fake engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from tests.mpi_server.fake_engine import FakeEngine, make_app

KEY = "test-key"


class Served:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.app = make_app(engine, api_key=KEY, strict_model_name=True)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        # Not the main thread, so uvicorn installs no signal handlers.
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with Served(FakeEngine(max_model_len=4096, token_delay=0.001)) as s:
        yield s


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base + "/v1", api_key=KEY, max_retries=0, timeout=30)


MSG = [{"role": "user", "content": "hi"}]


def test_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=20,
                                       logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content == "Hello from fake"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].logprobs.content[0].top_logprobs[1].token == "A"


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="fake-model", messages=MSG, stream=True,
                                            n=2, seed=1,
                                            stream_options={"include_usage": True})
    texts, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert texts == {0: "Hello from fake #1", 1: "Hello from fake #2"}
    assert finish == {0: "stop", 1: "stop"}
    assert usage is not None and usage.completion_tokens == 2 * 19


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="fake-model", prompt="abc", max_tokens=5, logprobs=1)
    assert r.choices[0].text == "Hello" and r.choices[0].finish_reason == "length"
    assert r.choices[0].logprobs.tokens == list("Hello")
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="fake-model", prompt=[1, 70, 71], stream=True, max_tokens=8) if c.choices)
    assert text == "Hello fr"


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-model"]


def test_errors(served: Served, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSG)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=0)
    assert e.value.param == "max_tokens"
    bad = openai.OpenAI(base_url=served.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(served.base + "/health").status_code == 200  # no key needed


def test_disconnect_mid_stream_aborts(served: Served) -> None:
    engine = served.engine
    before = set(engine.aborted)
    body = {"messages": MSG, "stream": True, "ignore_eos": True, "max_tokens": 3000}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", served.base + "/v1/chat/completions", json=body,
                      headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any("chat.completion.chunk" in x for x in got)
    deadline = time.monotonic() + 10
    while set(engine.aborted) == before or engine.running:
        assert time.monotonic() < deadline, "server did not abort after the client left"
        time.sleep(0.02)
    (rid,) = set(engine.aborted) - before
    assert rid in engine.closed_unfinished


def test_disconnect_non_streaming_aborts(served: Served) -> None:
    engine = served.engine
    before = set(engine.aborted)
    body = {"prompt": "hi", "ignore_eos": True, "max_tokens": 3000}
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.base + "/v1/completions", json=body, headers=headers, timeout=0.5)
    deadline = time.monotonic() + 10
    while set(engine.aborted) == before or engine.running:
        assert time.monotonic() < deadline, "server did not abort after the client left"
        time.sleep(0.02)
    (rid,) = set(engine.aborted) - before
    assert rid in engine.closed_unfinished


def test_body_limit_over_a_real_socket(served: Served) -> None:
    big = b'{"prompt": "' + b"y" * (5 << 20) + b'"}'  # over the auto limit of 4 MiB
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    for content in (big, chunked()):
        r = httpx.post(served.base + "/v1/completions", content=content, headers=headers,
                       timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(served.base + "/health").status_code == 200
