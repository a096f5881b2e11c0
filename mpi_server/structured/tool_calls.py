"""DeepSeek tool-call syntax -> OpenAI ``tool_calls``, incrementally (streamed text in, deltas out).

The V2.5 / V3 / R1 form (what their chat templates render and the models emit)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {ARGS}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

and the V3.1 form ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGS}<｜tool▁call▁end｜>`` (no
``function``, no fence); both are accepted in one parser. As llama.cpp's parser does, it also
takes the opener spellings models are seen to produce (``<｜tool_calls_begin｜>``,
``<｜tool calls begin｜>``, ``<｜tool\\_calls\\_begin｜>``, ``<｜tool▁calls｜>``), a missing
``<｜tool▁call▁begin｜>`` and whitespace around the pieces; whitespace before the opener is not
content. Text before the block is content; so is text after ``<｜tool▁calls▁end｜>``.

Arguments are passed on as the model wrote them (stripped), not re-serialised, so streamed
fragments concatenate to exactly the final ``arguments``. Inside the V3 form a fence ```` ``` ````
ends the arguments only outside JSON strings (a string may hold code). The markers are special
tokens: decode generated ids with ``skip_special_tokens=False`` before feeding the parser.
"""

from __future__ import annotations

from collections.abc import Callable

from ._markers import find_first, partial_start
from .tool_call_types import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN_VARIANTS,
    CALLS_END,
    FENCE,
    SEP,
    ParseDelta,
    ParsedMessage,
    ToolCall,
    ToolCallDelta,
    new_call_id,
)

__all__ = ["ToolCallParser", "parse_tool_calls"]

# parser states
_CONTENT, _BLOCK, _HEADER, _V3_NAME, _V3_FENCE, _ARGS, _FENCE_CLOSE = range(7)
_ARG_ENDS = (CALL_END, CALLS_END)


class ToolCallParser:
    """Feed generated text in any chunks; get content and tool-call deltas back.

    ``feed(text) -> ParseDelta`` as text arrives, ``finish() -> ParseDelta`` once at the end
    (flushes text held back because it might have begun a marker). `content` and
    `tool_calls` hold the totals so far; they equal the concatenated deltas.
    """

    def __init__(self, id_factory: Callable[[int], str] = new_call_id) -> None:
        self._id_factory = id_factory
        self._state = _CONTENT
        self._buf = ""
        self._ws = ""  # whitespace held back at the end of content / arguments
        self._strip = False  # drop leading whitespace of the next content
        self._v3 = True  # current call uses the fenced V3 form
        self._in_str = False  # inside a JSON string in the arguments
        self._esc = False
        self._args_started = False
        self._delta = ParseDelta()
        self.content = ""
        self.tool_calls: list[ToolCall] = []

    def feed(self, text: str) -> ParseDelta:
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> ParseDelta:
        self._run(final=True)
        if self._state == _CONTENT:
            self._content(self._buf, hold_ws=False)
        elif self._state == _ARGS:
            self._args(self._buf, hold_ws=True)  # a truncated call keeps what it has
        self._buf = self._ws = ""
        return self._take()

    def result(self) -> ParsedMessage:
        return ParsedMessage(self.content, list(self.tool_calls))

    # -- the state machine ------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        while self._step(final):
            pass

    def _step(self, final: bool) -> bool:  # one branch per state
        buf = self._buf
        if self._state == _CONTENT:
            if self._strip:
                buf = self._buf = buf.lstrip()
                if not buf:
                    return False
                self._strip = False
            found = find_first(buf, CALLS_BEGIN_VARIANTS)
            if found is not None:
                pos, marker = found
                self._content(buf[:pos], hold_ws=True)
                self._ws = ""  # whitespace before the block is not content
                self._buf = buf[pos + len(marker):]
                self._state = _BLOCK
                return True
            cut = len(buf) if final else partial_start(buf, CALLS_BEGIN_VARIANTS)
            self._content(buf[:cut], hold_ws=True)
            self._buf = buf[cut:]
            return False
        if self._state == _BLOCK:
            buf = self._buf = buf.lstrip()
            if not buf:
                return False
            for marker, state in ((CALL_BEGIN, _HEADER), (CALLS_END, _CONTENT)):
                if buf.startswith(marker):
                    self._buf = buf[len(marker):]
                    self._state = state
                    self._strip = state == _CONTENT
                    return True
            if not final and any(m.startswith(buf) for m in (CALL_BEGIN, CALLS_END)):
                return False
            self._state = _HEADER  # <｜tool▁call▁begin｜> left out
            return True
        if self._state == _HEADER:
            found = find_first(buf, (SEP, CALL_END, CALLS_END))
            if found is None:
                return False
            pos, marker = found
            self._buf = buf[pos + len(marker):]
            if marker != SEP:  # a call without a name: dropped
                self._state = _BLOCK if marker == CALL_END else _CONTENT
                self._strip = marker == CALLS_END
                return True
            header = buf[:pos].strip()
            if header == "function":
                self._state = _V3_NAME
            else:
                self._start_call(header, v3=False)
            return True
        if self._state == _V3_NAME:
            rest = buf.lstrip()
            if rest.startswith("{"):  # V3.1 form of a function named "function"
                self._buf = rest
                self._start_call("function", v3=False)
                return True
            newline = buf.find("\n")
            if newline < 0 or not buf[:newline].strip():
                if newline >= 0:
                    self._buf = buf[newline + 1:]
                    return True
                return False
            self._buf = buf[newline + 1:]
            self._start_call(buf[:newline].strip(), v3=True)
            self._state = _V3_FENCE
            return True
        if self._state == _V3_FENCE:
            rest = buf.lstrip()
            opening = FENCE + "json"
            if not final and (not rest or opening.startswith(rest)):
                return False
            for prefix in (opening, FENCE):
                if rest.startswith(prefix):
                    rest = rest[len(prefix):]
                    break
            self._buf = rest
            self._state = _ARGS
            return True
        if self._state == _ARGS:
            return self._scan_args(final)
        if self._state == _FENCE_CLOSE:
            found = find_first(buf, _ARG_ENDS)
            if found is None:
                self._buf = buf[partial_start(buf, _ARG_ENDS):]
                return False
            pos, marker = found
            self._buf = buf[pos + len(marker):]
            self._end_block_or_call(marker)
            return True
        raise AssertionError(self._state)

    def _scan_args(self, final: bool) -> bool:
        buf = self._buf
        if not self._args_started:
            buf = buf.lstrip()
            if not buf:
                self._buf = ""
                return False
            self._args_started = True
        closers = (*_ARG_ENDS, FENCE) if self._v3 else _ARG_ENDS
        i, n = 0, len(buf)
        while i < n:
            ch = buf[i]
            if ch == "<" or (ch == "`" and self._v3 and not self._in_str):
                for marker in _ARG_ENDS:
                    if buf.startswith(marker, i):
                        self._args(buf[:i], hold_ws=True)
                        self._ws = ""
                        self._buf = buf[i + len(marker):]
                        self._end_block_or_call(marker)
                        return True
                if ch == "`" and buf.startswith(FENCE, i):
                    self._args(buf[:i], hold_ws=True)
                    self._ws = ""
                    self._buf = buf[i + len(FENCE):]
                    self._state = _FENCE_CLOSE
                    return True
                if not final and any(m.startswith(buf[i:]) for m in closers):
                    break  # the chunk ends inside what may be a closer
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            i += 1
        self._args(buf[:i], hold_ws=True)
        self._buf = buf[i:]
        return False

    def _end_block_or_call(self, marker: str) -> None:
        self._state = _BLOCK if marker == CALL_END else _CONTENT
        self._strip = marker == CALLS_END

    # -- output -----------------------------------------------------------------------------

    def _start_call(self, name: str, v3: bool) -> None:
        index = len(self.tool_calls)
        call = ToolCall(self._id_factory(index), name)
        self.tool_calls.append(call)
        self._delta.tool_calls.append(ToolCallDelta(index, call.id, name, ""))
        self._state = _ARGS
        self._v3 = v3
        self._in_str = self._esc = self._args_started = False
        self._ws = ""

    def _content(self, text: str, hold_ws: bool) -> None:
        text = self._ws + text
        keep = text.rstrip() if hold_ws else text
        self._ws = text[len(keep):]
        if keep:
            self.content += keep
            self._delta.content += keep

    def _args(self, text: str, hold_ws: bool) -> None:
        text = self._ws + text
        keep = text.rstrip() if hold_ws else text
        self._ws = text[len(keep):]
        if not keep:
            return
        call = self.tool_calls[-1]
        call.arguments += keep
        deltas = self._delta.tool_calls
        if deltas and deltas[-1].index == len(self.tool_calls) - 1:
            deltas[-1].arguments += keep
        else:
            deltas.append(ToolCallDelta(len(self.tool_calls) - 1, arguments=keep))

    def _take(self) -> ParseDelta:
        delta, self._delta = self._delta, ParseDelta()
        return delta


def parse_tool_calls(text: str, id_factory: Callable[[int], str] = new_call_id
                     ) -> ParsedMessage:
    """The whole-text form: content and tool calls of a finished generation."""
    parser = ToolCallParser(id_factory)
    parser.feed(text)
    parser.finish()
    return parser.result()
