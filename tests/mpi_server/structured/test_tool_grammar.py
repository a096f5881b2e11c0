"""tool_choice required / named: the grammar forces DeepSeek tool calls with valid arguments."""

from __future__ import annotations

import json

import pytest

from llama_mpi.mpi_server.structured import (
    ConstraintError,
    compiler_for,
    parse_tool_calls,
    tool_call_constraint,
)
from llama_mpi.mpi_server.structured.tool_call_types import CALLS_BEGIN

from .conftest import random_walk, validate

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 20},
        "filters": {"type": "array", "maxItems": 2,
                    "items": {"type": "object", "properties": {"tag": {"enum": ["x", "y"]}},
                              "required": ["tag"], "additionalProperties": False}},
    },
    "required": ["query", "filters"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}


def generate_calls(tokenizer, spec, seeds):
    compiled = compiler_for(tokenizer).compile(spec)
    outputs = random_walk([compiled.matcher() for _ in seeds], seeds, tokenizer.eos_id)
    return [parse_tool_calls(tokenizer.decode(ids, skip_special_tokens=False))
            for ids in outputs]


def assert_valid(message, names=SCHEMAS):
    assert message.content == "" and message.tool_calls
    for call in message.tool_calls:
        assert call.name in names
        validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_required_gives_calls_that_validate(tokenizer):
    spec = tool_call_constraint(TOOLS, "required",
                                special_tokens=compiler_for(tokenizer).vocab.special_tokens)
    messages = generate_calls(tokenizer, spec, range(10))
    for message in messages:
        assert_valid(message)
    assert {c.name for m in messages for c in m.tool_calls} == set(SCHEMAS)


def test_markers_are_forced_as_single_special_tokens(tokenizer):
    vocab = compiler_for(tokenizer).vocab
    spec = tool_call_constraint(TOOLS, "required", special_tokens=vocab.special_tokens)
    mask = compiler_for(tokenizer).compile(spec).matcher().allowed_mask()
    assert mask.sum() == 1 and mask[tokenizer.token_to_id(CALLS_BEGIN)]


def test_named_function_and_single_call(tokenizer):
    choice = {"type": "function", "function": {"name": "search"}}
    spec = tool_call_constraint(TOOLS, choice, parallel_tool_calls=False,
                                special_tokens=compiler_for(tokenizer).vocab.special_tokens)
    for message in generate_calls(tokenizer, spec, range(5)):
        assert_valid(message, names={"search"})
        assert len(message.tool_calls) == 1


def test_v31_syntax(tokenizer):
    spec = tool_call_constraint(TOOLS, "required", syntax="v31",
                                special_tokens=compiler_for(tokenizer).vocab.special_tokens)
    for message in generate_calls(tokenizer, spec, range(5)):
        assert_valid(message)


def test_markers_spelled_as_text_without_special_tokens(small_tokenizer):
    vocab = compiler_for(small_tokenizer).vocab
    assert CALLS_BEGIN not in vocab.special_tokens
    spec = tool_call_constraint(TOOLS, "required", special_tokens=vocab.special_tokens)
    for message in generate_calls(small_tokenizer, spec, range(3)):
        assert_valid(message)


def test_reasoning_prefix_then_calls(tokenizer):
    compiler = compiler_for(tokenizer)
    spec = tool_call_constraint(TOOLS, "required", reasoning_prefix=True,
                                special_tokens=compiler.vocab.special_tokens)
    text = ("The user wants weather.</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
            "function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Oslo", "unit": "celsius"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    matcher = compiler.compile(spec).matcher()
    for token in tokenizer.encode(text, add_bos=False, parse_special=True):
        assert matcher.accept(token), matcher.error
    assert matcher.can_end()


@pytest.mark.parametrize("choice", ["auto", "none", None])
def test_auto_and_none_need_no_constraint(choice):
    assert tool_call_constraint(TOOLS, choice) is None


def test_unknown_named_function_is_an_error():
    with pytest.raises(ConstraintError, match=r"^tool_choice\.function\.name: "):
        tool_call_constraint(TOOLS, {"type": "function", "function": {"name": "nope"}})


def test_bad_parameters_schema_names_the_tool(tokenizer):
    tools = [TOOLS[0], {"type": "function",
                        "function": {"name": "bad", "parameters": {"type": "nonsense"}}}]
    spec = tool_call_constraint(tools, "required")
    with pytest.raises(ConstraintError) as info:
        compiler_for(tokenizer).compile(spec)
    assert info.value.field == "tools[1].function.parameters"


@pytest.mark.parametrize("tools, field", [
    ([], "tools"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "code_interpreter"}], "tools[0].type"),
    ([{"type": "function", "function": {"name": "f", "parameters": 3}}],
     "tools[0].function.parameters"),
])
def test_malformed_tools_name_the_field(tools, field):
    with pytest.raises(ConstraintError) as info:
        tool_call_constraint(tools, "required")
    assert info.value.field == field


def test_streamed_generation_reassembles_to_the_same_calls(small_tokenizer):
    """Token-by-token text (markers spelled over several tokens) parses to the same calls."""
    import codecs

    from llama_mpi.mpi_server.structured import ToolCallParser

    vocab = compiler_for(small_tokenizer).vocab
    spec = tool_call_constraint(TOOLS, "required", special_tokens=vocab.special_tokens)
    (ids,) = random_walk([compiler_for(small_tokenizer).compile(spec).matcher()], [11],
                         small_tokenizer.eos_id)
    whole = parse_tool_calls(small_tokenizer.decode(ids, skip_special_tokens=False),
                             id_factory=str)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    parser = ToolCallParser(id_factory=str)
    deltas = [parser.feed(decoder.decode(small_tokenizer.token_to_piece(t))) for t in ids]
    deltas.append(parser.feed(decoder.decode(b"", final=True)))
    deltas.append(parser.finish())
    arguments: dict[int, str] = {}
    for delta in deltas:
        for t in delta.tool_calls:
            arguments[t.index] = arguments.get(t.index, "") + t.arguments
    assert [arguments[i] for i in sorted(arguments)] == [c.arguments for c in whole.tool_calls]
    assert parser.result() == whole
    assert_valid(whole)
