"""``reasoning_format: deepseek``: ``<think>...</think>`` to ``reasoning_content``, incrementally.

Semantics, as llama.cpp's ``--reasoning-format deepseek`` (``try_parse_reasoning``):

- A reasoning block opens only at the start of the output (after whitespace) with
  ``<think>``; a ``<think>`` later in the text is content.
- R1-style templates end the prompt with ``<think>`` (then the model writes no opening tag):
  pass ``starts_in_reasoning=True`` (`prompt_opens_reasoning(prompt)` tells) and the output
  starts inside the block; a ``<think>`` the model writes anyway is dropped.
- Reasoning runs to ``</think>``; without one (cut off, or the model never closed it) all of
  it stays reasoning.
- Whitespace at both ends of a block is dropped, and so is whitespace between ``</think>`` and
  the content (or a further ``<think>`` block right after, which is reasoning too).
  Whitespace before an opening ``<think>`` is dropped as well (llama.cpp keeps it as content).

Markers may be split across chunks anywhere: text that may begin a marker is held back until
the next chunk (or `finish`) decides. Deltas concatenate to the totals `reasoning`/`content`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._markers import partial_start

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_OPENING, _REASONING, _CONTENT = range(3)


def prompt_opens_reasoning(prompt: str) -> bool:
    """The rendered prompt ends inside an open ``<think>`` (as R1 chat templates leave it)."""
    return prompt.rstrip().endswith(THINK_OPEN)


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class ReasoningSplitter:
    """``feed(text) -> ReasoningDelta`` per chunk, ``finish()`` once at the end."""

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self._state = _OPENING
        self._forced = starts_in_reasoning  # the next block needs no opening tag
        self._buf = ""
        self._ws = ""  # trailing whitespace of the reasoning, held back
        self._lead = True  # at the start of a reasoning block (drop whitespace)
        self._closed = False  # a </think> was seen
        self._delta = ReasoningDelta()
        self.reasoning = ""
        self.content = ""

    def feed(self, text: str) -> ReasoningDelta:
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> ReasoningDelta:
        while self._step(final=True):
            pass
        if self._buf:  # held text that did not turn into a marker
            if self._state == _REASONING:
                self._reason(self._buf)
            else:
                self._say(self._buf)
        self._buf = self._ws = ""
        return self._take()

    def _step(self, final: bool) -> bool:
        if self._state == _OPENING:  # start of output, or just after </think>
            rest = self._buf.lstrip()
            if rest.startswith(THINK_OPEN):
                self._buf = rest[len(THINK_OPEN):]
                self._enter_reasoning()
                return True
            if not final and THINK_OPEN.startswith(rest):  # empty, or a partial <think>
                return False
            if self._forced:
                self._buf = rest
                self._enter_reasoning()
                return True
            if self._closed:  # whitespace after </think> is dropped; at the start, kept
                self._buf = rest
            self._state = _CONTENT
            return True
        if self._state == _REASONING:
            buf = self._buf
            if self._lead:
                buf = buf.lstrip()
                if buf:
                    self._lead = False
            pos = buf.find(THINK_CLOSE)
            if pos >= 0:
                self._reason(buf[:pos])
                self._ws = ""
                self._buf = buf[pos + len(THINK_CLOSE):]
                self._state = _OPENING
                self._closed = True
                return True
            cut = len(buf) if final else partial_start(buf, (THINK_CLOSE,))
            self._reason(buf[:cut])
            self._buf = buf[cut:]
            return False
        self._say(self._buf)
        self._buf = ""
        return False

    def _enter_reasoning(self) -> None:
        self._state = _REASONING
        self._forced = False
        self._lead = True

    def _reason(self, text: str) -> None:
        text = self._ws + text
        keep = text.rstrip()
        self._ws = text[len(keep):]
        if keep:
            self.reasoning += keep
            self._delta.reasoning += keep

    def _say(self, text: str) -> None:
        if text:
            self.content += text
            self._delta.content += text

    def _take(self) -> ReasoningDelta:
        delta, self._delta = self._delta, ReasoningDelta()
        return delta


def split_reasoning(text: str, starts_in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning_content, content) of a finished generation."""
    splitter = ReasoningSplitter(starts_in_reasoning)
    splitter.feed(text)
    splitter.finish()
    return splitter.reasoning, splitter.content
