"""DeepSeek's tool-call markers and the OpenAI-shaped results of parsing them."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Any

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
CALLS_BEGIN_VARIANTS = (CALLS_BEGIN, "<｜tool_calls_begin｜>", "<｜tool calls begin｜>",
                        "<｜tool\\_calls\\_begin｜>", "<｜tool▁calls｜>")
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
FENCE = "```"

_ID_CHARS = string.ascii_letters + string.digits


def new_call_id(index: int = 0) -> str:
    """An OpenAI-style call id: ``call_`` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


def detect_tool_syntax(chat_template: str | None) -> str | None:
    """"v3" (``function<｜tool▁sep｜>NAME`` + fenced JSON), "v31" (``NAME<｜tool▁sep｜>ARGS``),
    or None when the template renders no DeepSeek tool calls."""
    if not chat_template or SEP not in chat_template:
        return None
    return "v3" if "```json" in chat_template else "v31"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """One ``delta.tool_calls[]`` entry: the first one of a call carries id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        function["arguments"] = self.arguments
        out["function"] = function
        return out


@dataclass
class ParseDelta:
    """What one `feed` adds: content text and tool-call fragments (merged per call)."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclass
class ParsedMessage:
    content: str
    tool_calls: list[ToolCall]
