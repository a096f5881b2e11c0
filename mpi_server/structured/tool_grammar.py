"""A constraint that forces DeepSeek's tool-call syntax (``tool_choice`` required or named).

The grammar (llguidance's lark dialect) admits exactly one tool-call block: the markers, a
tool's name, and arguments valid for that tool's ``parameters`` JSON schema; one call, or
several (newline-separated, as the templates render them) with ``parallel_tool_calls``. A
marker that is a special token of the vocabulary (DeepSeek V2.5/V3 have all five) is matched
as that token (``<｜tool▁calls▁begin｜>`` in lark), otherwise as its text. With
``reasoning_prefix`` (R1-style prompt ending in ``<think>``), free reasoning text up to
``</think>`` may come first. ``tool_choice`` "auto" and "none" need no constraint (None).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .compiler import DEFAULT_JSON_OPTIONS
from .errors import ConstraintError
from .reasoning import THINK_CLOSE
from .spec import ConstraintSpec, canonical_json, from_lark
from .tool_call_types import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# OpenAI: a function without "parameters" takes none, so its arguments are {}
_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_call_constraint(
    tools: Sequence[Any] | None,
    tool_choice: Any,
    *,
    syntax: str = "v3",
    parallel_tool_calls: bool = True,
    special_tokens: Mapping[str, int] | None = None,
    reasoning_prefix: bool = False,
    json_options: dict[str, Any] | None = None,
) -> ConstraintSpec | None:
    """The constraint for `tool_choice` over `tools` (OpenAI request shapes), or None.

    ``syntax`` is "v3" or "v31" (`tool_calls.detect_tool_syntax` of the chat template);
    ``special_tokens`` is ``GrammarVocab.special_tokens`` (text -> id). ConstraintError names
    the field at fault.
    """
    special_tokens = special_tokens or {}
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if syntax not in ("v3", "v31"):
        raise ValueError(f"syntax must be 'v3' or 'v31', not {syntax!r}")
    functions = _functions(tools)
    if tool_choice == "required":
        chosen = list(range(len(functions)))
    else:
        name = _named_choice(tool_choice)
        chosen = [i for i, (n, _) in enumerate(functions) if n == name]
        if not chosen:
            raise ConstraintError("tool_choice.function.name", f"no tool named {name!r} in tools")
    options = dict(DEFAULT_JSON_OPTIONS if json_options is None else json_options)

    def token(text: str) -> str:
        if text in special_tokens:
            return f"<[{special_tokens[text]}]>"
        return json.dumps(text, ensure_ascii=False)

    lines = ["%llguidance {}"]
    calls = "calls" if not reasoning_prefix else "think calls"
    lines.append(f"start: {calls}")
    if reasoning_prefix:
        if THINK_CLOSE in special_tokens:
            lines.append(f"think: THINK_TEXT {token(THINK_CLOSE)} THINK_WS")
            lines.append("THINK_TEXT: /(?s:.*)/")
        else:
            lines.append("think: think_text THINK_WS")
            lines.append("think_text[lazy]: /(?s:.*)<\\/think>/")
        lines.append("THINK_WS: /[ \\t\\r\\n]*/")
    repeat = ' ("\\n"? call)*' if parallel_tool_calls else ""
    lines.append(f"calls: {token(CALLS_BEGIN)} call{repeat} {token(CALLS_END)}")
    lines.append("call: " + " | ".join(f"fn_{i}" for i in chosen))
    parts: list[tuple[str, str]] = []
    for i in chosen:
        name, parameters = functions[i]
        schema = copy.deepcopy(parameters)
        if isinstance(schema, dict):
            schema.setdefault("x-guidance", options)
        field = f"tools[{i}].function.parameters"
        parts.append((field, canonical_json(schema)))
        if syntax == "v3":
            head = f'"function" {token(SEP)} {json.dumps(name + chr(10) + "```json" + chr(10))}'
            lines.append(f'fn_{i}: {token(CALL_BEGIN)} {head} args_{i} "\\n```" {token(CALL_END)}')
        else:
            lines.append(f"fn_{i}: {token(CALL_BEGIN)} {json.dumps(name)} {token(SEP)} args_{i} "
                         f"{token(CALL_END)}")
        lines.append(f"args_{i}: %json {canonical_json(schema)}")
    return from_lark("\n".join(lines) + "\n", "tools", tuple(parts))


def _functions(tools: Sequence[Any] | None) -> list[tuple[str, Any]]:
    if not tools or not isinstance(tools, (list, tuple)):
        raise ConstraintError("tools", "tool_choice needs a non-empty list of tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ConstraintError(f"{where}.type", "only function tools are supported")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ConstraintError(f"{where}.function", "must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConstraintError(f"{where}.function.name",
                                  f"{name!r} is not 1-64 letters, digits, '_', '-' or '.'")
        parameters = function.get("parameters", _EMPTY_PARAMETERS)
        if parameters is None:
            parameters = _EMPTY_PARAMETERS
        if not isinstance(parameters, dict):
            raise ConstraintError(f"{where}.function.parameters", "must be a JSON schema object")
        out.append((name, parameters))
    return out


def _named_choice(tool_choice: Any) -> str:
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else tool_choice.get("name")
        if isinstance(name, str):
            return name
    raise ConstraintError("tool_choice", "must be 'none', 'auto', 'required' or "
                          '{"type": "function", "function": {"name": ...}}')
