"""OpenAI endpoints against the fake engine: shapes, streaming, usage, n, logprobs."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.mpi_server.fake_engine import BOS, FakeEngine, make_app


def events(resp) -> list:
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in resp.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: ")
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def test_models(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "fake-model"


def test_chat_shape(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 50})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "fake-model"
    (choice,) = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Hello from fake"},
                      "logprobs": None, "finish_reason": "stop"}
    prompt_len = len(engine.calls[0][1])
    u = body["usage"]
    assert u["prompt_tokens"] == prompt_len
    assert u["completion_tokens"] == len("Hello from fake") + 1  # + EOS
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_chat_params_reach_engine(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={
        **CHAT, "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
        "min_p": 0.05, "presence_penalty": 0.1, "frequency_penalty": 0.2,
        "repeat_penalty": 1.1, "logit_bias": {"5": -100}, "stop": "xyz", "seed": 7,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    p = engine.calls[0][2]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (5, 0.5, 0.9, 40, 0.05)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.1, 0.2, 1.1)
    assert p.logit_bias == {5: -100.0} and p.stop == ["xyz"] and p.seed == 7 and p.ignore_eos
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_max_tokens_absent_uses_context(client: TestClient, engine: FakeEngine) -> None:
    client.post("/v1/chat/completions", json=CHAT)
    _, prompt, params = engine.calls[0]
    assert params.max_tokens == engine.max_model_len - len(prompt)


def test_n_predict_alias(client: TestClient, engine: FakeEngine) -> None:
    client.post("/v1/completions", json={"prompt": "x", "n_predict": 3})
    assert engine.calls[0][2].max_tokens == 3


def test_chat_stream(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    ev = events(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello from fake"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "usage" not in chunks[-1]


def test_chat_stream_include_usage(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        **CHAT, "stream": True, "stream_options": {"include_usage": True}})
    ev = events(r)
    last = ev[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 16
    assert all(c["usage"] is None for c in ev[:-2])


def test_chat_n2_seeds(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "n": 2, "seed": 10})
    body = r.json()
    texts = sorted((c["index"], c["message"]["content"]) for c in body["choices"])
    assert texts == [(0, "Hello from fake #10"), (1, "Hello from fake #11")]
    assert sorted(p.seed for _, _, p in engine.calls) == [10, 11]
    assert all(p.n == 1 for _, _, p in engine.calls)
    assert body["usage"]["completion_tokens"] == 2 * (len("Hello from fake #10") + 1)


def test_chat_n2_stream(client: TestClient) -> None:
    ev = events(client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True}))
    per = {0: "", 1: ""}
    finish = {}
    for c in ev[:-1]:
        ch = c["choices"][0]
        per[ch["index"]] += ch["delta"].get("content", "")
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert per == {0: "Hello from fake", 1: "Hello from fake"}
    assert finish == {0: "stop", 1: "stop"}


def test_chat_logprobs(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        **CHAT, "logprobs": True, "top_logprobs": 2, "max_tokens": 3})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["content"]) == 3
    first = lp["content"][0]
    assert first["token"] == "H" and first["logprob"] == -0.25 and first["bytes"] == [72]
    assert [t["token"] for t in first["top_logprobs"]] == ["H", "A"]
    assert set(first["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_chat_logprobs_stream(client: TestClient) -> None:
    ev = events(client.post("/v1/chat/completions", json={
        **CHAT, "logprobs": True, "max_tokens": 2, "stream": True}))
    lps = [c["choices"][0]["logprobs"] for c in ev[:-1] if c["choices"][0]["logprobs"]]
    assert [x["content"][0]["token"] for x in lps] == ["H", "e"]


def test_completion_shape_and_prompts(client: TestClient, engine: FakeEngine) -> None:
    for prompt in ["abc", [BOS, 70, 71], ["abc"], [[BOS, 70]]]:
        r = client.post("/v1/completions", json={"model": "fake.gguf", "prompt": prompt})
        assert r.status_code == 200, (prompt, r.text)
        body = r.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["choices"][0]["text"] == "Hello from fake"
        assert body["choices"][0]["finish_reason"] == "stop"
    assert engine.calls[0][1][0] == BOS and engine.calls[1][1] == [BOS, 70, 71]


def test_completion_stop_list(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "a", "stop": ["from", "zz"]})
    c = r.json()["choices"][0]
    assert c["text"] == "Hello fro" and c["finish_reason"] == "stop"


def test_completion_legacy_logprobs(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "a", "logprobs": 2, "max_tokens": 4})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["H", "e", "l", "l"]
    assert lp["token_logprobs"] == [-0.25] * 4
    assert lp["top_logprobs"][0] == {"H": -0.25, "A": -1.5}
    assert lp["text_offset"] == [0, 1, 2, 3]


def test_completion_stream_usage_and_offsets(client: TestClient) -> None:
    ev = events(client.post("/v1/completions", json={
        "prompt": "a", "stream": True, "logprobs": 0, "max_tokens": 3,
        "stream_options": {"include_usage": True}}))
    assert ev[-1] == "[DONE]"
    chunks = [c for c in ev[:-1] if c["choices"]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hel"
    assert [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks] == [0, 1, 2]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] == 3


def test_completion_n2(client: TestClient) -> None:
    body = client.post("/v1/completions", json={"prompt": "a", "n": 2, "max_tokens": 2}).json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1]
    assert body["usage"]["completion_tokens"] == 4


def test_display_chat_prints(engine: FakeEngine, capsys) -> None:
    client = TestClient(make_app(engine, display_chat=True))
    client.post("/v1/chat/completions", json=CHAT)
    out = capsys.readouterr().out
    assert "[user] hi" in out and "Hello from fake" in out


def test_special_flag(engine: FakeEngine) -> None:
    TestClient(make_app(engine)).post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
    TestClient(make_app(engine, special=True)).post("/v1/completions", json={"prompt": "a"})
    assert [p.skip_special_tokens for _, _, p in engine.calls] == [True, False]


def test_text_content_parts_join_with_a_newline_as_in_the_template(client) -> None:
    """One rule for content parts (llama.cpp's): the HTTP layer and the template agree."""
    from llama_mpi.models.tokenizer.chat_template import join_text_parts

    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert join_text_parts(parts, 0) == "a\nb"
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": parts}], "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a\nb"}], "max_tokens": 1}
    ).json()["usage"]["prompt_tokens"]
    bad = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
