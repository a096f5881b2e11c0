"""Structured outputs, tool calls and reasoning content against a real ``llama-server`` on the
tiny random model: the constraint guarantees valid output whatever the weights.

The server runs the built-in ``deepseek3`` template (it renders DeepSeek's V3 tool-call
syntax) and ``--reasoning-format deepseek``. The tiny model's byte-level vocabulary has no
tool-call marker tokens, so the tool grammar spells the markers as text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.mpi_server.server_process import build_tiny_model, running_server

jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema (the test extra)")

SERVER_ARGS = ("-t", "1", "--chat-template", "deepseek3", "--reasoning-format", "deepseek")
CHAT = [{"role": "user", "content": "Describe a pet."}]

# Nested objects, an array of objects, enums, bounded strings and integers, required keys:
# every branch is finite, so a random model finishes it well within max_tokens.
PET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "maxItems": 2,
                 "items": {"type": "object",
                           "properties": {"label": {"type": "string", "maxLength": 4},
                                          "weight": {"enum": [1, 2, 3]}},
                           "required": ["label", "weight"], "additionalProperties": False}},
        "owner": {"type": "object",
                  "properties": {"first": {"type": "string", "maxLength": 6},
                                 "vip": {"type": "boolean"},
                                 "pets": {"type": "array", "items": {"enum": ["a", "b"]},
                                          "minItems": 1, "maxItems": 3}},
                  "required": ["first", "vip", "pets"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 10},
                          "unit": {"enum": ["c", "f"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "ping", "description": "No arguments"}},
]
THINK_GRAMMAR = 'root ::= "<think>" [a-z]{1,6} "</think>" [a-z]{1,6}'
SAMPLES = 20
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = build_tiny_model(tmp_path_factory.mktemp("structured-model"))
    with running_server(Path(model), *SERVER_ARGS) as base:
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"messages": CHAT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]


def gather(url: str, bodies: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """POST all at once (they share the engine's batches); the JSON replies, in order."""
    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            replies = await asyncio.gather(*(c.post(p, json=b) for p, b in bodies))
        for r in replies:
            assert r.status_code == 200, r.text
        return [r.json() for r in replies]

    return asyncio.run(run())


def assert_pet(text: str) -> None:
    jsonschema.validate(json.loads(text), PET_SCHEMA)


# -- JSON schema -----------------------------------------------------------------------------


def test_json_schema_output_validates_in_every_seeded_sample(url: str) -> None:
    bodies = [("/v1/chat/completions", {"messages": CHAT, "seed": s, "max_tokens": MAX_TOKENS,
                                        "response_format": RESPONSE_FORMAT})
              for s in range(SAMPLES)]
    replies = gather(url, bodies)
    texts = [r["choices"][0]["message"]["content"] for r in replies]
    for reply, text in zip(replies, texts, strict=True):
        assert reply["choices"][0]["finish_reason"] == "stop", text
        assert_pet(text)
    assert len(set(texts)) > SAMPLES // 2  # the seeds do sample different objects


def test_json_schema_streamed_validates_in_every_seeded_sample(http: httpx.Client) -> None:
    for seed in range(SAMPLES):
        events = stream_events(http, "/v1/chat/completions", {
            "messages": CHAT, "seed": seed, "max_tokens": MAX_TOKENS,
            "response_format": RESPONSE_FORMAT})
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        assert_pet(text)


def test_json_schema_with_n_2_validates_every_choice(url: str) -> None:
    bodies = [("/v1/chat/completions", {"messages": CHAT, "seed": 100 + 2 * s, "n": 2,
                                        "max_tokens": MAX_TOKENS,
                                        "response_format": RESPONSE_FORMAT})
              for s in range(SAMPLES // 2)]
    for reply in gather(url, bodies):
        assert len(reply["choices"]) == 2
        for choice in reply["choices"]:
            assert_pet(choice["message"]["content"])


def test_constrained_and_free_requests_share_batches(url: str) -> None:
    free = {"messages": CHAT, "max_tokens": 24, "ignore_eos": True}
    bodies: list[tuple[str, dict[str, Any]]] = []
    for s in range(SAMPLES):
        bodies.append(("/v1/chat/completions", {**free, "seed": s}))
        bodies.append(("/v1/chat/completions", {"messages": CHAT, "seed": s,
                                                "max_tokens": MAX_TOKENS,
                                                "response_format": RESPONSE_FORMAT}))
    replies = gather(url, bodies)
    for i, reply in enumerate(replies):
        choice = reply["choices"][0]
        if i % 2:
            assert_pet(choice["message"]["content"])
        else:  # the free rows are not masked: 24 tokens of whatever the model says
            assert choice["finish_reason"] == "length"
            assert reply["usage"]["completion_tokens"] == 24


def test_json_schema_on_both_completion_endpoints(url: str) -> None:
    replies = gather(url, [
        ("/v1/completions", {"prompt": "A pet:", "seed": 1, "max_tokens": MAX_TOKENS,
                             "response_format": RESPONSE_FORMAT}),
        ("/completion", {"prompt": "A pet:", "seed": 2, "n_predict": MAX_TOKENS,
                         "json_schema": PET_SCHEMA}),
        ("/completion", {"prompt": "A pet:", "seed": 3, "response_format": {
            "type": "json_object", "schema": PET_SCHEMA}}),
    ])
    assert_pet(replies[0]["choices"][0]["text"])
    assert_pet(replies[1]["content"])
    assert_pet(replies[2]["content"])


def test_json_object_gives_an_object(http: httpx.Client) -> None:
    out = chat(http, seed=5, max_tokens=MAX_TOKENS, response_format={"type": "json_object"},
               logit_bias={})
    choice = out["choices"][0]
    if choice["finish_reason"] == "stop":  # free-form JSON may run past the budget
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["message"]["content"].startswith("{")


def test_logprobs_are_over_the_tokens_the_grammar_allows(http: httpx.Client) -> None:
    out = chat(http, seed=3, max_tokens=MAX_TOKENS, response_format=RESPONSE_FORMAT,
               logprobs=True, top_logprobs=5)
    first = out["choices"][0]["logprobs"]["content"][0]
    assert first["token"].startswith("{")
    assert first["top_logprobs"]
    assert all(t["token"].startswith("{") for t in first["top_logprobs"])


def test_gbnf_grammar_and_reasoning_content(http: httpx.Client) -> None:
    out = chat(http, seed=4, grammar=THINK_GRAMMAR)
    message = out["choices"][0]["message"]
    assert message["reasoning_content"].isalpha() and message["content"].isalpha()
    r = http.post("/completion", json={"prompt": "x", "seed": 4, "grammar": THINK_GRAMMAR})
    text = r.json()["content"]  # no reasoning split outside chat
    assert text.startswith("<think>") and "</think>" in text
    events = stream_events(http, "/v1/chat/completions",
                           {"messages": CHAT, "seed": 4, "grammar": THINK_GRAMMAR})
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]


def test_openai_client_parse_with_a_pydantic_model(url: str) -> None:
    class Owner(BaseModel):
        first: str = Field(max_length=6)
        vip: bool

    class Pet(BaseModel):
        name: str = Field(max_length=8)
        kind: Literal["cat", "dog"]
        age: int = Field(ge=0, le=20)
        owner: Owner

    with OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        for seed in range(3):
            done = client.chat.completions.parse(model="tiny", messages=CHAT, response_format=Pet,
                                                 seed=seed, max_tokens=MAX_TOKENS)
            pet = done.choices[0].message.parsed
            assert isinstance(pet, Pet) and isinstance(pet.owner, Owner)


# -- tools ---------------------------------------------------------------------------------


def check_call(call: dict[str, Any]) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    args = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        jsonschema.validate(args, WEATHER)
    else:
        assert call["function"]["name"] == "ping" and args == {}


def reassemble(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    calls: dict[int, dict[str, Any]] = {}
    for e in events:
        for d in e["choices"][0]["delta"].get("tool_calls", []) if e["choices"] else []:
            call = calls.setdefault(d["index"], {"type": "function",
                                                 "function": {"name": "", "arguments": ""}})
            if "id" in d:
                call["id"] = d["id"]
            call["function"]["name"] += d["function"].get("name") or ""
            call["function"]["arguments"] += d["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def test_tool_choice_required_gives_valid_calls_streamed_or_not(http: httpx.Client) -> None:
    names = set()
    for seed in range(8):
        # one call each: a random model never decides to stop adding parallel calls
        body = {"messages": CHAT, "tools": TOOLS, "tool_choice": "required", "seed": seed,
                "max_tokens": MAX_TOKENS, "parallel_tool_calls": False}
        choice = chat(http, **body)["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        calls = choice["message"]["tool_calls"]
        assert calls and choice["message"]["content"] is None
        for call in calls:
            check_call(call)
            names.add(call["function"]["name"])
        events = stream_events(http, "/v1/chat/completions", body)
        streamed = reassemble(events)
        assert [c["function"] for c in streamed] == [c["function"] for c in calls]
        assert all(c["id"].startswith("call_") for c in streamed)
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert names == {"get_weather", "ping"}


def test_parallel_calls_are_each_valid(http: httpx.Client) -> None:
    counts = []
    for seed in range(4):
        choice = chat(http, tools=TOOLS, tool_choice="required", seed=seed,
                      max_tokens=MAX_TOKENS)["choices"][0]
        calls = choice["message"]["tool_calls"]
        if choice["finish_reason"] == "length":  # cut off inside a further call
            calls = calls[:-1]
        else:
            assert choice["finish_reason"] == "tool_calls"
        for call in calls:
            check_call(call)
        counts.append(len(calls))
    assert max(counts) > 1


def test_named_tool_and_no_parallel_calls(http: httpx.Client) -> None:
    for seed in range(4):
        choice = chat(http, messages=CHAT, tools=TOOLS, seed=seed, max_tokens=MAX_TOKENS,
                      tool_choice={"type": "function", "function": {"name": "get_weather"}},
                      parallel_tool_calls=False, ignore_eos=True)["choices"][0]
        assert choice["finish_reason"] == "tool_calls"  # the grammar ends it, ignore_eos or not
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        check_call(call)


def test_tool_history_renders_and_auto_or_none_generate_freely(http: httpx.Client) -> None:
    history = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for choice in ("auto", "none"):
        out = chat(http, messages=history, tools=TOOLS, tool_choice=choice, max_tokens=8,
                   ignore_eos=True, seed=1)
        assert out["choices"][0]["finish_reason"] in ("length", "tool_calls", "stop")
    with_tools = chat(http, messages=CHAT, tools=TOOLS, max_tokens=1, temperature=0)
    without = chat(http, messages=CHAT, max_tokens=1, temperature=0)
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]  # listed


# -- bad requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "foo"}}}}, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "string", "pattern": "(("}}}}, "response_format.json_schema.schema"),
    ("/completion", {"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}},
     "json_schema"),
    ("/completion", {"json_schema": [1, 2]}, "json_schema"),
    ("/completion", {"grammar": "root ::= missing"}, "grammar"),
    ("/completion", {"grammar": "root ::= \"unterminated"}, "grammar"),
    ("/completion", {"grammar": "", "json_schema": {}}, "grammar"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "wat"}}}}}],
        "tool_choice": "required"}, "tools[0].function.parameters"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools[0].function.name"),
])
def test_bad_schemas_grammars_and_tools_are_400_naming_the_field(
    http: httpx.Client, path: str, body: dict[str, Any], param: str
) -> None:
    body = {**body, ("messages" if path.endswith("chat/completions") else "prompt"):
            CHAT if path.endswith("chat/completions") else "x"}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"].startswith(param) or param in error["message"], error


def test_metrics_count_constrained_tokens(http: httpx.Client) -> None:
    chat(http, seed=9, max_tokens=MAX_TOKENS, response_format=RESPONSE_FORMAT)
    text = http.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("llama_mpi_") and " " in line}
    assert values["llama_mpi_constrained_tokens_total"] > 0
    assert 0 < values["llama_mpi_grammar_seconds_total"] < values[
        "llama_mpi_constrained_step_seconds_total"]
