"""Every bad input gets its status and an OpenAI error body, and the app keeps serving."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from llama_mpi.mpi_server.http import create_app
from tests.mpi_server.fake_engine import (
    VOCAB,
    FakeEngine,
    FakeTokenizer,
    fake_chat_to_ids,
    make_app,
)

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=64)


def assert_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if status == 400:
        assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize(
    "path, body, param, code",
    [
        (CHAT, {"messages": []}, "messages", None),
        (CHAT, {}, "messages", "missing"),
        (CHAT, {"messages": "hi"}, "messages", None),
        (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages", None),
        (CHAT, {"messages": [{"content": "x"}]}, None, "missing"),
        (CHAT, {"messages": MSG, "max_tokens": 0}, "max_tokens", None),
        (CHAT, {"messages": MSG, "max_completion_tokens": -3}, "max_completion_tokens", None),
        (CHAT, {"messages": MSG, "max_tokens": "many"}, "max_tokens", None),
        (CHAT, {"messages": MSG, "temperature": -1}, "temperature", None),
        (CHAT, {"messages": MSG, "temperature": "hot"}, "temperature", None),
        (CHAT, {"messages": MSG, "top_p": 0}, "top_p", None),
        (CHAT, {"messages": MSG, "top_k": -5}, "top_k", None),
        (CHAT, {"messages": MSG, "min_p": 2}, "min_p", None),
        (CHAT, {"messages": MSG, "presence_penalty": 3}, "presence_penalty", None),
        (CHAT, {"messages": MSG, "frequency_penalty": -3}, "frequency_penalty", None),
        (CHAT, {"messages": MSG, "repetition_penalty": 0}, "repetition_penalty", None),
        (CHAT, {"messages": MSG, "n": 0}, "n", None),
        (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 50}, "top_logprobs", None),
        (CHAT, {"messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias", None),
        (CHAT, {"messages": MSG, "logit_bias": {str(VOCAB + 5): 1}}, "logit_bias", None),
        (CHAT, {"messages": [{"role": "user", "content": "x" * 100}]}, "messages",
         "context_length_exceeded"),
        (CMPL, {"prompt": "y" * 80}, "prompt", "context_length_exceeded"),
        (CMPL, {"prompt": [VOCAB + 1]}, "prompt", None),
        (CMPL, {"prompt": []}, "prompt", None),
        (CMPL, {"prompt": ["a", "b"]}, "prompt", None),
        (CMPL, {"prompt": 5}, "prompt", None),
        (CMPL, {"prompt": "a", "max_tokens": 0}, "max_tokens", None),
        (CMPL, {"prompt": "a", "stop": 3}, "stop", None),
        ("/completion", {"prompt": "a", "n_predict": 0}, "n_predict", None),
        ("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 0}}, "max_new_tokens",
         None),
        ("/generate", {"parameters": {}}, "inputs", "missing"),
    ],
)
def test_bad_input(client: TestClient, engine: FakeEngine, path, body, param, code) -> None:
    assert_error(client.post(path, json=body), 400, param, code)
    assert engine.calls == []
    # ... and the app keeps serving.
    assert client.post(CMPL, json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_malformed_json(client: TestClient) -> None:
    r = client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_error(r, 400, code="json_invalid")
    r = client.post(CHAT, content=b"not json", headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_any_model_name_is_served(client: TestClient) -> None:
    # One model behind the server: like llama.cpp, any requested name gets it.
    for name in ("gpt-4", "fake-model", "fake.gguf", ""):
        r = client.post(CHAT, json={"model": name, "messages": MSG})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "fake-model"


def test_strict_model_name(engine: FakeEngine) -> None:
    client = TestClient(make_app(engine, strict_model_name=True))
    assert_error(client.post(CHAT, json={"model": "gpt-4", "messages": MSG}), 404, "model",
                 "model_not_found")
    assert_error(client.post(CMPL, json={"model": "gpt-4", "prompt": "a"}), 404, "model")
    for ok in ("fake-model", "fake.gguf", ""):
        assert client.post(CHAT, json={"model": ok, "messages": MSG}).status_code == 200
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["fake-model"]


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nope"), 404)
    assert_error(client.get(CHAT), 405)


def test_queue_full_503(client: TestClient, engine: FakeEngine) -> None:
    engine.full = True
    for stream in (False, True):
        r = client.post(CHAT, json={"messages": MSG, "stream": stream})
        assert_error(r, 503, code="queue_full")
        assert r.headers["retry-after"] == "1"
    engine.full = False
    assert client.post(CHAT, json={"messages": MSG}).status_code == 200


def test_engine_dead_503(client: TestClient, engine: FakeEngine) -> None:
    engine.dead = True  # generate raises EngineDeadError
    err = assert_error(client.post(CMPL, json={"prompt": "a"}), 503, code="engine_dead")
    assert err["type"] == "server_error"


def test_error_mid_generation(client: TestClient, engine: FakeEngine) -> None:
    engine.fail_midway = True
    assert_error(client.post(CMPL, json={"prompt": "a"}), 500)
    r = client.post(CHAT, json={"messages": MSG, "stream": True})
    assert r.status_code == 200
    assert '"error"' in r.text and r.text.endswith("data: [DONE]\n\n")


def test_auth() -> None:
    client = TestClient(make_app(api_key="s3cret"))
    assert client.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.post(CHAT, json={"messages": MSG}, headers=headers)
        assert_error(r, 401, code="invalid_api_key")
        assert_error(client.get("/metrics", headers=headers), 401)
        assert_error(client.get("/v1/models", headers=headers), 401)
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post(CHAT, json={"messages": MSG}, headers=ok).status_code == 200
    assert client.get("/v1/models", headers=ok).status_code == 200


def test_loading_then_ready() -> None:
    app = create_app(None, None, None, model_name="m", api_key=None, vocab_size=0,
                     max_model_len=0)
    client = TestClient(app)
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    assert_error(client.post(CHAT, json={"messages": MSG}), 503, code="model_loading")
    app.state.server.attach(FakeEngine(), FakeTokenizer(), fake_chat_to_ids, VOCAB, 64)
    assert client.get("/health").json() == {"status": "ok"}
    assert client.post(CHAT, json={"messages": MSG}).status_code == 200


def test_shutdown_refuses_new_requests() -> None:
    engine = FakeEngine()
    app = make_app(engine)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        app.state.server.draining = True
        assert_error(client.post(CHAT, json={"messages": MSG}), 503, code="shutting_down")
        assert client.get("/health").status_code == 503
    assert engine.shut_down  # lifespan shutdown awaited engine.shutdown()
