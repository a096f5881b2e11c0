"""The streaming DeepSeek tool-call parser on hand-written model outputs."""

from __future__ import annotations

import pytest

from llama_mpi.mpi_server.structured import ToolCallParser, detect_tool_syntax, parse_tool_calls

B, E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CB, CE, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

V3 = (f"Let me look that up.\n\n{B}{CB}function{SEP}get_weather\n```json\n"
      '{"city": "Paris", "note": "a ```fence``` in a string"}\n```'
      f"{CE}\n{CB}function{SEP}search\n```json\n{{}}\n```{CE}{E}")
V3_CALLS = [("get_weather", '{"city": "Paris", "note": "a ```fence``` in a string"}'),
            ("search", "{}")]
V31 = f'{B}{CB}get_weather{SEP}{{"city": "<b>Oslo</b>"}}{CE}{CB}noop{SEP}{{}}{CE}{E}'
V31_CALLS = [("get_weather", '{"city": "<b>Oslo</b>"}'), ("noop", "{}")]


def ids(index: int) -> str:
    return f"call_{index}"


def stream(chunks: list[str]):
    """Parser result and the deltas, fed chunk by chunk."""
    parser = ToolCallParser(ids)
    deltas = [parser.feed(c) for c in chunks] + [parser.finish()]
    return parser.result(), deltas


def reassemble(deltas):
    """Content and (id, name, arguments) per call, from streamed deltas as a client does."""
    content, calls = "", {}
    for d in deltas:
        content += d.content
        for t in d.tool_calls:
            wire = t.to_openai()
            if t.index not in calls:
                assert wire["id"] == ids(t.index) and wire["type"] == "function"
                assert "name" in wire["function"]
                calls[t.index] = [wire["id"], wire["function"]["name"], ""]
            else:
                assert "id" not in wire and "name" not in wire["function"]
            calls[t.index][2] += wire["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)]


def as_tuples(message):
    return [(c.name, c.arguments) for c in message.tool_calls]


def test_v3_complete_text():
    message = parse_tool_calls(V3, ids)
    assert message.content == "Let me look that up."
    assert as_tuples(message) == V3_CALLS
    assert message.tool_calls[0].to_openai() == {
        "id": "call_0", "type": "function",
        "function": {"name": "get_weather", "arguments": V3_CALLS[0][1]}}


@pytest.mark.parametrize("text, content, calls", [(V3, "Let me look that up.", V3_CALLS),
                                                  (V31, "", V31_CALLS)])
def test_split_at_every_boundary(text, content, calls):
    for cut in range(len(text) + 1):
        message, deltas = stream([text[:cut], text[cut:]])
        assert message.content == content and as_tuples(message) == calls, cut
        assert reassemble(deltas) == (content, [(ids(i), n, a) for i, (n, a) in
                                                enumerate(calls)]), cut


@pytest.mark.parametrize("text, content, calls", [(V3, "Let me look that up.", V3_CALLS),
                                                  (V31, "", V31_CALLS)])
def test_one_character_at_a_time(text, content, calls):
    message, deltas = stream(list(text))
    assert as_tuples(message) == calls
    assert reassemble(deltas) == (content, [(ids(i), n, a) for i, (n, a) in enumerate(calls)])
    # arguments really stream: more than one fragment for the first call
    assert sum(1 for d in deltas for t in d.tool_calls if t.index == 0 and t.arguments) > 1


def test_v31_form():
    message = parse_tool_calls(V31, ids)
    assert message.content == "" and as_tuples(message) == V31_CALLS


@pytest.mark.parametrize("text", [
    "Just an answer, no tools.",
    "Markup <b>and</b> a ```code``` fence, a ｜ bar, and <｜tool almost a marker",
    "trailing whitespace stays \n\n",
])
def test_plain_content_passes_through(text):
    for cut in range(len(text) + 1):
        message, deltas = stream([text[:cut], text[cut:]])
        assert message.content == text and message.tool_calls == []
        assert reassemble(deltas) == (text, [])


def test_opener_variant_and_missing_call_begin():
    text = f"<｜tool_calls_begin｜>function{SEP}f\n```json\n{{\"a\": 1}}\n```{CE}{E}"
    assert as_tuples(parse_tool_calls(text, ids)) == [("f", '{"a": 1}')]


def test_text_after_the_block_is_content():
    text = f"{B}{CB}f{SEP}{{}}{CE}{E}\n\nDone."
    message = parse_tool_calls(text, ids)
    assert as_tuples(message) == [("f", "{}")] and message.content == "Done."


def test_truncated_call_keeps_its_partial_arguments():
    message, _ = stream([f"{B}{CB}function{SEP}f\n```json\n", '{"a": [1, 2'])
    assert as_tuples(message) == [("f", '{"a": [1, 2')]


def test_ids_are_openai_style_and_unique():
    message = parse_tool_calls(V3)
    first, second = (c.id for c in message.tool_calls)
    assert first.startswith("call_") and len(first) == 29 and first != second


def test_detect_tool_syntax():
    assert detect_tool_syntax("{{'<｜tool▁sep｜>' + name + '\\n```json\\n'}}") == "v3"
    assert detect_tool_syntax("{{name + '<｜tool▁sep｜>' + arguments}}") == "v31"
    assert detect_tool_syntax("{{ messages }}") is None and detect_tool_syntax(None) is None
