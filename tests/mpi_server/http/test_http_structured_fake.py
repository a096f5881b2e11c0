"""Structured outputs at the HTTP edge over the scripted engine (no grammar compiled): the
reply shaping (reasoning_content, tool_calls, finish_reason "tool_calls", streamed deltas),
the 400s for requests this server cannot honour, and the fields it ignores."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from tests.mpi_server.fake_engine import FakeEngine, fake_chat_to_ids, make_app

CALL = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CHAT = [{"role": "user", "content": "hi"}]


class ScriptedEngine(FakeEngine):
    def __init__(self, text: str) -> None:
        super().__init__(max_model_len=4096)
        self.text = text

    def reply(self, params: SamplingParams) -> str:
        return self.text


class ToolChat:
    """A chat encoder whose template renders DeepSeek V3 tool calls (what the real one says)."""

    tool_syntax = "v3"
    compiler = None

    def __init__(self) -> None:
        self.tools: list[Any] = []

    def __call__(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        self.tools.append(tools)
        return fake_chat_to_ids(messages)


def client_for(text: str, chat: Any = None, **kw: Any) -> tuple[TestClient, ScriptedEngine]:
    engine = ScriptedEngine(text)
    app = make_app(engine, **kw)
    if chat is not None:
        state = app.state.server
        state.chat_to_ids, state.tool_syntax = chat, chat.tool_syntax
    return TestClient(app), engine


def events(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_reasoning_content_split_whole_and_streamed() -> None:
    client, _ = client_for("<think>mull it over</think>The answer.", reasoning_format="deepseek")
    message = client.post("/v1/chat/completions", json={"messages": CHAT}).json()[
        "choices"][0]["message"]
    assert message == {"role": "assistant", "content": "The answer.",
                       "reasoning_content": "mull it over"}
    deltas = [e["choices"][0]["delta"] for e in events(client, {"messages": CHAT})]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "mull it over"
    assert "".join(d.get("content", "") for d in deltas) == "The answer."
    # without the flag the tags stay in the content, as llama.cpp's "none"
    plain, _ = client_for("<think>x</think>y")
    assert plain.post("/v1/chat/completions", json={"messages": CHAT}).json()[
        "choices"][0]["message"]["content"] == "<think>x</think>y"


def test_tool_calls_parsed_with_ids_and_finish_reason() -> None:
    chat = ToolChat()
    client, engine = client_for("Let me look." + CALL, chat)
    body = {"messages": CHAT, "tools": TOOLS}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert chat.tools[-1] == TOOLS  # the template got the tools
    assert engine.calls[-1][2].skip_special_tokens is False  # the markers reach the parser
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look."
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}

    stream = events(client, body)
    deltas = [e["choices"][0]["delta"] for e in stream]
    pieces = [t for d in deltas for t in d.get("tool_calls", [])]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "get_weather"
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"city": "Oslo"}'
    assert "".join(d.get("content", "") for d in deltas) == "Let me look."
    assert stream[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_neither_renders_nor_parses_tools() -> None:
    chat = ToolChat()
    client, _ = client_for(CALL, chat)
    choice = client.post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "tool_choice": "none"}).json()["choices"][0]
    assert chat.tools[-1] is None
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"


def test_tool_history_messages_reach_the_template() -> None:
    chat = ToolChat()
    client, _ = client_for("ok", chat)
    history = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param, words", [
    ({"tools": TOOLS}, "tools", "does not support tool calls"),
    ({"tools": TOOLS, "tool_choice": "required"}, "tools", "does not support tool calls"),
    ({"tool_choice": "required"}, "tools", "needs a non-empty list of tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", "'sometimes'"),
    ({"functions": [{"name": "f"}]}, "functions", "use 'tools'"),
    ({"function_call": {"name": "f"}}, "function_call", "tool_choice"),
    ({"modalities": ["text", "audio"]}, "modalities", "text only"),
    ({"mirostat": 2}, "mirostat", "mirostat"),
    ({"typical_p": 0.5}, "typical_p", "not implemented"),
    ({"response_format": {"type": "json_object"}, "grammar": "root ::= \"a\""}, "grammar",
     "at most one"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'xml'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"a": "\ud800"}}}},
     "response_format", "surrogate"),
])
def test_requests_this_server_cannot_honour_are_400(body: dict[str, Any], param: str,
                                                    words: str) -> None:
    client, engine = client_for("x")
    raw = json.dumps({"messages": CHAT, **body})  # ASCII: a lone surrogate as its \u escape
    r = client.post("/v1/chat/completions", content=raw,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert not engine.calls


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "tail"}, "suffix"),
    ("/completion", {"dry_multiplier": 0.8}, "dry_multiplier"),
    ("/completion", {"samplers": ["top_k"]}, "samplers"),
])
def test_unsupported_completion_fields_are_400(path: str, body: dict[str, Any],
                                               param: str) -> None:
    client, _ = client_for("x")
    r = client.post(path, json={"prompt": "p", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_harmless_extras_and_neutral_values_stay_ignored() -> None:
    client, _ = client_for("fine")
    extras = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
              "modalities": ["text"], "mirostat": 0, "typical_p": 1.0, "function_call": "auto",
              "response_format": {"type": "text"}, "tool_choice": "none",
              "parallel_tool_calls": True}
    r = client.post("/v1/chat/completions", json={"messages": CHAT, **extras})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "fine"
    r = client.post("/v1/completions", json={"prompt": "p", "best_of": 1, "suffix": None})
    assert r.status_code == 200, r.text


def test_a_constraint_needs_a_vocabulary_the_grammar_library_can_read() -> None:
    client, _ = client_for("x")  # the scripted engine's byte tokenizer is not a GGUF vocabulary
    r = client.post("/v1/chat/completions", json={
        "messages": CHAT, "response_format": {"type": "json_object"}})
    assert r.status_code == 400
    assert "unavailable" in r.json()["error"]["message"]
