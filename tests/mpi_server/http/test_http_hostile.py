"""Hostile input: oversized bodies and prompts, out-of-range numbers, lone surrogates, a sick
engine. Each gets a 4xx (or a 503 that says why) and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from llama_mpi.mpi_server.http import openai_routes, server_state
from llama_mpi.mpi_server.http.limits import CHARS_PER_TOKEN, MIN_BODY_BYTES
from tests.mpi_server.fake_engine import VOCAB, FakeEngine, FakeTokenizer, make_app

MSG = [{"role": "user", "content": "hi"}]
CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
L = 64  # max_model_len of the fixture engine
GENERATING = [
    (CHAT, {"messages": MSG}),
    (CMPL, {"prompt": "a"}),
    ("/completion", {"prompt": "a"}),
    ("/generate", {"inputs": "a"}),
    ("/generate_stream", {"inputs": "a"}),
]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=L)


def post_raw(client: TestClient, path: str, body: Any) -> httpx.Response:
    """JSON as Python writes it: NaN, Infinity and ``\\udXXX`` escapes included."""
    return client.post(path, content=json.dumps(body).encode(),
                       headers={"content-type": "application/json"})


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    if param is not None:  # LightLLM's sampling fields are under "parameters"
        assert err["param"] in (param, f"parameters.{param}"), err
    if code is not None:
        assert err["code"] == code, err
    return err


def with_field(path: str, body: dict, name: str, value: Any) -> dict:
    """``body`` with a sampling field set where the route takes it (LightLLM: parameters)."""
    if path.startswith("/generate"):
        return {**body, "parameters": {name: value}}
    return {**body, name: value}


def serves(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.post(CMPL, json={"prompt": "a", "max_tokens": 2}).status_code == 200


class CountingTokenizer(FakeTokenizer):
    def __init__(self) -> None:
        self.encoded: list[int] = []  # lengths of the texts encode was given
        self.decoded = 0

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True):
        self.encoded.append(len(text))
        return super().encode(text, add_bos, parse_special)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += 1
        return super().decode(ids, skip_special_tokens)


def app_with(tokenizer: Any, engine: FakeEngine | None = None, **kw: Any) -> Any:
    from llama_mpi.mpi_server.http import create_app
    from tests.mpi_server.fake_engine import fake_chat_to_ids

    engine = engine or FakeEngine(max_model_len=L)
    calls: list[int] = []

    def chat_to_ids(messages: list[dict[str, Any]]) -> list[int]:
        calls.append(len(messages))
        return fake_chat_to_ids(messages)

    app = create_app(engine, tokenizer, chat_to_ids, model_name="fake-model", api_key=None,
                     vocab_size=VOCAB, max_model_len=engine.max_model_len, **kw)
    app.state.chat_calls = calls
    return app


# -- 1. request size ------------------------------------------------------------------------


def test_auto_body_limit() -> None:
    assert server_state(make_app(FakeEngine(max_model_len=64))).body_limit() == MIN_BODY_BYTES
    assert server_state(make_app(FakeEngine(max_model_len=1 << 20))).body_limit() == 64 << 20
    assert server_state(make_app(max_request_bytes=1234)).body_limit() == 1234
    # The loading app follows the context length the model brings.
    from llama_mpi.mpi_server.http import attach_engine, create_app
    from tests.mpi_server.fake_engine import fake_chat_to_ids

    app = create_app(None, None, None, model_name="m", api_key=None, vocab_size=0,
                     max_model_len=0)
    assert server_state(app).body_limit() == MIN_BODY_BYTES
    attach_engine(app, FakeEngine(), FakeTokenizer(), fake_chat_to_ids, VOCAB, 1 << 17)
    assert server_state(app).body_limit() == 8 << 20


@pytest.mark.parametrize("path", [CHAT, CMPL, "/completion", "/tokenize", "/detokenize",
                                  "/generate"])
def test_body_over_limit_413(path: str, engine: FakeEngine) -> None:
    client = TestClient(make_app(engine, max_request_bytes=1000))
    body = {"messages": [{"role": "user", "content": "x" * 2000}], "prompt": "x" * 2000,
            "content": "x" * 2000, "tokens": [5] * 500, "inputs": "x" * 2000}
    err = assert_error(client.post(path, json=body), 413, code="request_too_large")
    assert err["type"] == "invalid_request_error" and "1000 bytes" in err["message"]
    assert engine.calls == []
    serves(client)


def test_auto_limit_413_at_4_mib(engine: FakeEngine) -> None:
    client = TestClient(make_app(engine))
    prompt = "y" * (MIN_BODY_BYTES - 100)
    r = client.post(CMPL, json={"prompt": prompt + "y" * 200})
    assert_error(r, 413, code="request_too_large")
    # Under the limit, the (cheap) prompt bound answers instead.
    assert_error(client.post(CMPL, json={"prompt": prompt}), 400, "prompt",
                 "context_length_exceeded")


def test_chunked_body_refused_as_it_arrives(engine: FakeEngine) -> None:
    app = make_app(engine, max_request_bytes=10_000)
    pulled = 0

    async def body():
        nonlocal pulled
        yield b'{"prompt": "'
        for _ in range(1000):  # 1 MB in all, sent without a Content-Length
            pulled += 1
            yield b"z" * 1000
        yield b'"}'

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post(CMPL, content=body(),
                                  headers={"content-type": "application/json"})
            ok = await client.post(CMPL, json={"prompt": "a", "max_tokens": 2})
            assert ok.status_code == 200
            return r

    r = asyncio.run(scenario())
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, code="request_too_large")
    assert pulled <= 11  # stopped reading just past 10 kB
    assert engine.calls[0][1] != []  # only the small request reached the engine
    assert len(engine.calls) == 1


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_oversized_requests_hold_no_memory(engine: FakeEngine) -> None:
    app = make_app(engine, max_request_bytes=1 << 20)
    big = b'{"prompt": "' + b"y" * (8 << 20) + b'"}'  # 8 MiB: the tokenizer would take GBs
    chunks = [big[i:i + (64 << 10)] for i in range(0, len(big), 64 << 10)]
    near = json.dumps({"prompt": "y" * ((1 << 20) - 100)}).encode()  # under the body limit

    async def chunked():
        for c in chunks:
            yield c

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            async def once() -> None:
                r = await client.post(CMPL, content=big, headers=headers)
                assert r.status_code == 413
                r = await client.post(CMPL, content=chunked(), headers=headers)
                assert r.status_code == 413
                r = await client.post(CMPL, content=near, headers=headers)
                assert r.status_code == 400, r.text

            await once()  # warm up
            tracemalloc.start()
            try:
                await once()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            # At most the 1 MiB the limit lets in, parsed once, not the 8 MiB nor its tokens.
            assert peak < 8 << 20, peak
            before = _rss_bytes()
            for _ in range(10):
                await once()
            grown = _rss_bytes() - before
            assert grown < 16 << 20, grown

    asyncio.run(scenario())
    assert engine.calls == []


# -- 1. prompt bounds before tokenizing -----------------------------------------------------


def test_long_prompt_refused_without_tokenizing() -> None:
    tok = CountingTokenizer()
    app = app_with(tok)
    client = TestClient(app)
    too_long = "y" * (CHARS_PER_TOKEN * L + 1)
    for path, body, param in [
        (CMPL, {"prompt": too_long}, "prompt"),
        (CMPL, {"prompt": [too_long]}, "prompt"),
        ("/completion", {"prompt": too_long}, "prompt"),
        ("/generate", {"inputs": too_long}, "inputs"),
        ("/tokenize", {"content": too_long}, "content"),
        (CHAT, {"messages": [{"role": "user", "content": too_long}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": too_long[:600]},
                             {"role": "user", "content": [{"type": "text",
                                                          "text": too_long[:600]}]}]},
         "messages"),
    ]:
        assert_error(client.post(path, json=body), 400, param, "context_length_exceeded")
    assert tok.encoded == [] and app.state.chat_calls == []
    # A prompt under the bound is still tokenized, and its real length decides.
    assert_error(client.post(CMPL, json={"prompt": "y" * 100}), 400, "prompt",
                 "context_length_exceeded")
    assert tok.encoded == [100]


def test_long_id_lists_refused() -> None:
    tok = CountingTokenizer()
    client = TestClient(app_with(tok))
    # Too many ids is the answer, before any id is looked at (these are not even valid).
    assert_error(client.post(CMPL, json={"prompt": [VOCAB + 1] * L}), 400, "prompt",
                 "context_length_exceeded")
    assert_error(client.post("/completion", json={"prompt": [[5] * L]}), 400, "prompt",
                 "context_length_exceeded")
    assert_error(client.post("/detokenize", json={"tokens": [5] * (L + 1)}), 400, "tokens",
                 "context_length_exceeded")
    assert tok.decoded == 0
    r = client.post("/detokenize", json={"tokens": [65 + 3] * L})  # a full context is fine
    assert r.status_code == 200 and r.json()["content"] == "A" * L


class SlowTokenizer(FakeTokenizer):
    delay = 0.3

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True):
        time.sleep(self.delay)
        return super().encode(text, add_bos, parse_special)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        time.sleep(self.delay)
        return super().decode(ids, skip_special_tokens)


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"content": "ab", "with_pieces": True}),
    ("/detokenize", {"tokens": [68, 69]}),
    (CMPL, {"prompt": "ab", "max_tokens": 1}),
])
def test_tokenizing_leaves_the_event_loop_free(path: str, body: dict) -> None:
    app = app_with(SlowTokenizer())

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            slow = asyncio.create_task(client.post(path, json=body))
            await asyncio.sleep(0.01)
            waits = []
            while not slow.done():  # the loop (and /health) answers at once all the while
                t0 = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                await asyncio.sleep(0.02)
                waits.append(time.perf_counter() - t0)
            assert (await slow).status_code == 200
            assert len(waits) > 5 and max(waits) < 0.15, waits

    asyncio.run(scenario())


class BlockingTokenizer(FakeTokenizer):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: list[str] = []

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True):
        self.started.append(text)
        assert self.release.wait(10)
        return super().encode(text, add_bos, parse_special)


def test_client_gone_while_tokenizing() -> None:
    tok = BlockingTokenizer()
    engine = FakeEngine(max_model_len=L)
    app = app_with(tok, engine)
    from llama_mpi.mpi_server.http.state import TOKENIZER_THREADS

    async def request(prompt: str, leave: asyncio.Event) -> list[dict]:
        body = json.dumps({"prompt": prompt}).encode()
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "path": CMPL, "raw_path": CMPL.encode(),
                 "query_string": b"", "root_path": "", "scheme": "http",
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("t", 1), "server": ("t", 80)}
        await app(scope, receive, send)
        return sent

    async def scenario() -> None:
        leave = asyncio.Event()
        # Busy every tokenizer thread, then one more request waits for a thread.
        tasks = [asyncio.create_task(request(f"p{i}", leave))
                 for i in range(TOKENIZER_THREADS + 1)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(tok.started) == TOKENIZER_THREADS:
                break
        await asyncio.sleep(0.05)
        assert len(tok.started) == TOKENIZER_THREADS
        leave.set()  # every client leaves while the tokenizer is still busy
        t0 = time.perf_counter()
        done = await asyncio.wait_for(asyncio.gather(*tasks), 2)
        assert time.perf_counter() - t0 < 1.0  # nobody waited for the tokenizer
        for sent in done:
            assert sent[0]["status"] == 499
        tok.release.set()
        await asyncio.sleep(0.2)

    try:
        asyncio.run(scenario())
    finally:
        tok.release.set()
    assert len(tok.started) == TOKENIZER_THREADS  # the queued job never ran
    assert engine.calls == []  # and nothing tokenized for a gone client was generated


# -- 2. seeds -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1e30, -2, 2**200, 1.5])
@pytest.mark.parametrize("path, body", GENERATING)
def test_seed_out_of_range_400(client: TestClient, engine: FakeEngine, path: str, body: dict,
                               seed: Any) -> None:
    assert_error(post_raw(client, path, with_field(path, body, "seed", seed)), 400, "seed")
    assert engine.calls == []
    serves(client)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", [(CHAT, {"messages": MSG}), (CMPL, {"prompt": "a"})])
def test_seed_of_each_choice_wraps(client: TestClient, engine: FakeEngine, path: str,
                                   body: dict, stream: bool) -> None:
    top = 2**64 - 1
    r = client.post(path, json={**body, "seed": top, "n": 3, "stream": stream})
    assert r.status_code == 200 and '"error"' not in r.text, r.text
    assert sorted(p.seed for _, _, p in engine.calls) == [0, 1, top]


def test_seed_bounds(client: TestClient, engine: FakeEngine) -> None:
    for seed, expect in [(0, 0), (2**64 - 1, 2**64 - 1), (-1, None), (None, None)]:
        engine.calls.clear()
        r = post_raw(client, CMPL, {"prompt": "a", "seed": seed})
        assert r.status_code == 200, r.text
        assert engine.calls[0][2].seed == expect


def test_sampler_takes_every_seed_the_edge_lets_through() -> None:
    import torch

    from llama_mpi.mpi_server.engine.sequence import make_generator

    for seed in (0, 2**63 - 1, 2**63, 2**64 - 1):
        make_generator(seed, "cpu")
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):  # kept from it now
        torch.Generator().manual_seed(2**64)


# -- 3. lone surrogates ---------------------------------------------------------------------

S = "a\ud800b"


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"messages": MSG, "model": "\ud800"}, "model"),
    (CHAT, {"messages": [{"role": "user", "content": S}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": S}]}]},
     "messages"),
    (CHAT, {"messages": [{"role": S, "content": "x"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "name": S}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "tool_calls": [{S: 1}]}]},
     "messages"),
    (CHAT, {"messages": MSG, "stop": S}, "stop"),
    (CHAT, {"messages": MSG, "stop": ["ok", S]}, "stop"),
    (CHAT, {"messages": MSG, "logit_bias": {"\udfff": 1}}, "logit_bias"),
    (CMPL, {"prompt": S}, "prompt"),
    (CMPL, {"prompt": [S]}, "prompt"),
    (CMPL, {"prompt": "a", "model": S}, "model"),
    ("/completion", {"prompt": S}, "prompt"),
    ("/completion", {"prompt": "a", "model": S}, "model"),
    ("/tokenize", {"content": S}, "content"),
    ("/generate", {"inputs": S}, "inputs"),
    ("/generate", {"inputs": "a", "parameters": {"stop_sequences": [S]}}, "stop_sequences"),
])
def test_lone_surrogate_400(client: TestClient, engine: FakeEngine, path: str, body: dict,
                            param: str) -> None:
    err = assert_error(post_raw(client, path, body), 400, param)
    assert err["type"] == "invalid_request_error"
    assert engine.calls == []
    serves(client)


def test_surrogate_in_any_error_message_is_sent() -> None:
    from llama_mpi.mpi_server.http.errors import APIError

    r = APIError(404, "no model `\ud800`").response()
    assert json.loads(r.body)["error"]["message"] == "no model `\\ud800`"


# -- 4. logit_bias --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [
    {"5": math.nan}, {"5": math.inf}, {"5": -math.inf}, {"5": 1e308}, {"5": 100.5},
    {"5": -101}, {" 12 ": 1}, {"1_3": 1}, {"\u0661\u0662": 1}, {"-1": 1}, {"+5": 1},
    {"1.0": 1}, {"": 1}, {"0x10": 1}, {"12\n": 1}, {str(VOCAB): 1}, {"9" * 30: 1},
    {"5": "lots"},
])
def test_bad_logit_bias_400(client: TestClient, engine: FakeEngine, bias: dict) -> None:
    for path, body in GENERATING[:3]:
        assert_error(post_raw(client, path, {**body, "logit_bias": bias}), 400, "logit_bias")
    assert engine.calls == []


def test_logit_bias_accepted(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(CMPL, json={"prompt": "a", "logit_bias": {"12": 100, "0": -100,
                                                              "007": 0.5}})
    assert r.status_code == 200, r.text
    assert engine.calls[0][2].logit_bias == {12: 100.0, 0: -100.0, 7: 0.5}


# -- 5. float sampling fields ---------------------------------------------------------------

FLOATS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "repeat_penalty"]
LIGHT_FLOATS = ["temperature", "top_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_400(client: TestClient, engine: FakeEngine, value: float) -> None:
    for path, body in GENERATING:
        names = LIGHT_FLOATS if path.startswith("/generate") else FLOATS
        for name in names:
            r = post_raw(client, path, with_field(path, body, name, value))
            assert_error(r, 400, name)
    assert engine.calls == []


def test_huge_top_k_is_clamped(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(CMPL, json={"prompt": "a", "top_k": 2**70, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert engine.calls[0][2].top_k == VOCAB


# -- 7. health ------------------------------------------------------------------------------

REASON = "rank 2 has not answered heartbeats for 6 s"


def test_health_reflects_the_engine(client: TestClient, engine: FakeEngine) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    engine.unhealthy = REASON
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json() == {"error": {"code": 503, "message": REASON, "type": "unavailable_error"}}
    engine.unhealthy = None
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_sick_engine_refuses_generation_at_once(client: TestClient, engine: FakeEngine,
                                                stream: bool) -> None:
    engine.unhealthy = REASON
    for path, body in GENERATING:
        r = client.post(path, json={**body, "stream": stream})
        err = assert_error(r, 503, code="engine_dead")
        assert REASON in err["message"] and err["type"] == "server_error"
    assert engine.calls == []
    # Tokenizing needs no engine; it still works.
    assert client.post("/tokenize", json={"content": "a"}).status_code == 200
    engine.unhealthy = None
    serves(client)


def test_health_probe_that_raises_or_is_missing(engine: FakeEngine) -> None:
    client = TestClient(make_app(engine))

    def broken() -> str | None:
        raise RuntimeError("probe exploded")

    engine.health = broken  # type: ignore[method-assign]
    r = client.get("/health")
    assert r.status_code == 503 and "probe exploded" in r.json()["error"]["message"]
    assert_error(client.post(CMPL, json={"prompt": "a"}), 503, code="engine_dead")
    engine.health = None  # type: ignore[assignment,method-assign] # an engine without health()
    serves(client)


def test_draining_and_loading_health() -> None:
    app = make_app()
    client = TestClient(app)
    server_state(app).draining = True
    assert client.get("/health").status_code == 503
    from llama_mpi.mpi_server.http import create_app

    loading = create_app(None, None, None, model_name="m", api_key=None, vocab_size=0,
                         max_model_len=0)
    r = TestClient(loading).get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"}


# -- 8. chat template errors ----------------------------------------------------------------


def test_chat_template_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_mpi.models.tokenizer import chat_template

    render_error = getattr(chat_template, "ChatTemplateRenderError", None)
    if render_error is None:  # not there yet: check the mapping with a stand-in
        class render_error(ValueError):  # type: ignore[no-redef]
            pass

        monkeypatch.setattr(openai_routes, "ChatTemplateRenderError", render_error)
    app = make_app()
    client = TestClient(app)
    state = server_state(app)

    def timed_out(messages: list[dict]) -> list[int]:
        raise render_error("rendering took longer than 5 s")

    state.chat_to_ids = timed_out
    err = assert_error(client.post(CHAT, json={"messages": MSG}), 500,
                       code="chat_template_error")
    assert err["type"] == "server_error" and "longer than 5 s" in err["message"]

    def refuses(messages: list[dict]) -> list[int]:
        raise chat_template.ChatTemplateError("Conversation roles must alternate")

    state.chat_to_ids = refuses
    err = assert_error(client.post(CHAT, json={"messages": MSG}), 400, "messages")
    assert "alternate" in err["message"]
