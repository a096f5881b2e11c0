"""The reasoning_format=deepseek splitter: <think> blocks to reasoning_content."""

from __future__ import annotations

import pytest

from llama_mpi.mpi_server.structured import (
    ReasoningSplitter,
    prompt_opens_reasoning,
    split_reasoning,
)

CASES = [
    # (text, starts_in_reasoning, reasoning, content)
    ("<think>\nThe user wants 2+2.\n</think>\n\nIt is 4.", False, "The user wants 2+2.",
     "It is 4."),
    ("The user wants 2+2.\n</think>\n\nIt is 4.", True, "The user wants 2+2.", "It is 4."),
    ("<think>again</think>It is 4.", True, "again", "It is 4."),
    ("No reasoning here, even with <think>tags</think> later.", False, "",
     "No reasoning here, even with <think>tags</think> later."),
    ("<think>cut off while thinki", False, "cut off while thinki", ""),
    ("<think>a</think>\n<think>b</think> done", False, "ab", "done"),
    ("<thi", False, "", "<thi"),
    ("", True, "", ""),
]


@pytest.mark.parametrize("text, forced, reasoning, content", CASES)
def test_complete_text(text, forced, reasoning, content):
    assert split_reasoning(text, forced) == (reasoning, content)


@pytest.mark.parametrize("text, forced, reasoning, content", CASES)
def test_split_at_every_boundary(text, forced, reasoning, content):
    for cut in range(len(text) + 1):
        splitter = ReasoningSplitter(forced)
        deltas = [splitter.feed(text[:cut]), splitter.feed(text[cut:]), splitter.finish()]
        assert "".join(d.reasoning for d in deltas) == reasoning, cut
        assert "".join(d.content for d in deltas) == content, cut
        assert (splitter.reasoning, splitter.content) == (reasoning, content)


def test_streams_reasoning_before_the_close_tag_arrives():
    splitter = ReasoningSplitter(starts_in_reasoning=True)
    assert splitter.feed("Thinking about it").reasoning == "Thinking about it"
    assert splitter.feed(" more </thi").reasoning == " more"  # a partial tag is held back
    delta = splitter.feed("nk>Answer")
    assert delta.reasoning == "" and delta.content == "Answer"


def test_missing_opening_tag_detected_from_the_prompt():
    assert prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜>")
