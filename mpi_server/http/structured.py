"""Structured outputs at the HTTP edge: request fields -> a compiled constraint, and generated
text -> ``content`` / ``reasoning_content`` / ``tool_calls`` (whole, or as stream deltas).

Constraints: ``response_format`` (``json_object``, ``json_schema``), llama.cpp's raw
``json_schema`` and GBNF ``grammar`` (at most one of the three), and on chat ``tool_choice``
"required" or a named function over ``tools``. Specs are built on the event loop (plain data),
compiled on the tokenizer threads (the compiler caches by schema); a constraint the grammar
library refuses is a 400 naming its field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from llama_mpi.mpi_server.http import serving
from llama_mpi.mpi_server.http.errors import APIError, bad_request
from llama_mpi.mpi_server.http.state import ServerState
from llama_mpi.mpi_server.structured import (
    ConstraintError,
    ConstraintSpec,
    ReasoningSplitter,
    ToolCallParser,
    from_gbnf,
    from_json_schema,
    from_response_format,
    prompt_opens_reasoning,
    tool_call_constraint,
)
from llama_mpi.mpi_server.structured.tool_call_types import new_call_id

_PROMPT_TAIL = 8  # tokens of the prompt decoded to see whether it opens a <think> block


def constraint_error(exc: ConstraintError) -> APIError:
    return bad_request(str(exc), param=exc.field, code="invalid_constraint")


def format_spec(body: Any) -> ConstraintSpec | None:
    """The one output-format constraint of a request (response_format / json_schema / grammar),
    or None; 400 if more than one is given or one is malformed."""
    specs: list[ConstraintSpec] = []
    try:
        if body.response_format is not None:
            spec = from_response_format(body.response_format)
            if spec is not None:
                specs.append(spec)
        if body.json_schema is not None:
            specs.append(from_json_schema(body.json_schema, "json_schema"))
        if body.grammar is not None:
            specs.append(from_gbnf(body.grammar, "grammar"))
    except ConstraintError as exc:
        raise constraint_error(exc) from exc
    if len(specs) > 1:
        raise bad_request("response_format, json_schema and grammar: give at most one of them",
                          param=specs[1].field.split(".")[0])
    return specs[0] if specs else None


@dataclass
class ToolPlan:
    """How a chat request uses ``tools``: what the template gets, whether the reply is parsed
    for tool calls, and the forcing constraint (tool_choice required / named)."""

    template_tools: list[dict[str, Any]] | None = None
    parse: bool = False
    choice: Any = None

    @property
    def forced(self) -> bool:
        return self.parse and self.choice not in (None, "auto")


def tool_plan(body: Any, state: ServerState) -> ToolPlan:
    """Check ``tools`` / ``tool_choice`` before the prompt is rendered (400s name the field)."""
    tools, choice = body.tools, body.tool_choice
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise bad_request(f"tool_choice: {choice!r} is not 'none', 'auto', 'required' or a "
                          "named function", param="tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice: needs a non-empty list of tools", param="tools")
        return ToolPlan()
    if choice == "none":  # no calls wanted: the template does not see the tools either
        return ToolPlan()
    if state.tool_syntax is None:
        raise bad_request("tools: this model's chat template does not support tool calls (it "
                          "renders no DeepSeek tool-call markers); pass a template that does with "
                          "--chat-template, or send the request without tools", param="tools")
    try:  # validates every tool's shape (cheap: builds the grammar text, compiles nothing)
        tool_call_constraint(tools, "required" if choice in (None, "auto") else choice,
                             syntax=state.tool_syntax)
    except ConstraintError as exc:
        raise constraint_error(exc) from exc
    return ToolPlan(list(tools), True, choice if choice is not None else "auto")


def opens_reasoning(state: ServerState, prompt_ids: list[int]) -> bool:
    tail = state.tokenizer.decode(prompt_ids[-_PROMPT_TAIL:], skip_special_tokens=False)
    return prompt_opens_reasoning(tail)


def tool_spec(body: Any, state: ServerState, plan: ToolPlan, reasoning_prefix: bool
              ) -> ConstraintSpec | None:
    if not plan.forced:
        return None
    compiler = state.grammar_compiler()
    try:
        return tool_call_constraint(
            plan.template_tools, plan.choice, syntax=state.tool_syntax or "v3",
            parallel_tool_calls=body.parallel_tool_calls is not False,
            special_tokens=compiler.vocab.special_tokens, reasoning_prefix=reasoning_prefix)
    except ConstraintError as exc:
        raise constraint_error(exc) from exc


async def compile_spec(request: Request, state: ServerState, spec: ConstraintSpec | None
                       ) -> Any:
    """The compiled grammar for ``spec`` (None for None), off the event loop."""
    if spec is None:
        return None
    compiler = state.grammar_compiler()
    try:
        return await serving.off_loop(request, state, compiler.compile, spec)
    except ConstraintError as exc:
        raise constraint_error(exc) from exc


@dataclass
class MessageParts:
    """What a reply's text adds to a chat message: the OpenAI fields, deltas or totals."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def __add__(self, later: MessageParts) -> MessageParts:
        return MessageParts(self.content + later.content, self.reasoning + later.reasoning,
                            self.tool_calls + later.tool_calls)

    def delta(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.content:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class ReplyShaper:
    """One choice's text through the reasoning splitter (``reasoning_format: deepseek``) and
    then the tool-call parser (tools active); both incremental, so chunks may split markers."""

    def __init__(self, reasoning: bool, starts_in_reasoning: bool, tools: bool,
                 id_factory: Callable[[int], str] = new_call_id) -> None:
        self.splitter = ReasoningSplitter(starts_in_reasoning) if reasoning else None
        self.parser = ToolCallParser(id_factory) if tools else None

    @property
    def active(self) -> bool:
        return self.splitter is not None or self.parser is not None

    def feed(self, text: str) -> MessageParts:
        return self._shape(text, final=False)

    def finish(self) -> MessageParts:
        return self._shape("", final=True)

    def _shape(self, text: str, final: bool) -> MessageParts:
        parts = MessageParts()
        content = text
        if self.splitter is not None:
            d = self.splitter.finish() if final else self.splitter.feed(text)
            parts.reasoning, content = d.reasoning, d.content
        if self.parser is not None:
            deltas = []
            if content:
                deltas.append(self.parser.feed(content))
            if final:
                deltas.append(self.parser.finish())
            content = "".join(d.content for d in deltas)
            parts.tool_calls = [c.to_openai() for d in deltas for c in d.tool_calls]
        parts.content = content
        return parts

    def whole(self, text: str) -> tuple[MessageParts, list[Any]]:
        """(totals, tool calls) of a finished text, in one go."""
        parts = self.feed(text) + self.finish()
        parts.tool_calls = []  # the whole calls come from the parser, not its deltas
        calls = list(self.parser.tool_calls) if self.parser is not None else []
        return parts, calls


def finish_reason(reason: str | None, calls: bool) -> str | None:
    """OpenAI's "tool_calls" for a reply that ended by itself after calling tools."""
    return "tool_calls" if calls and reason == "stop" else reason
