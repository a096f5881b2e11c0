"""Chat templates: jinja2 rendering set up the way transformers' `apply_chat_template` does.

The template comes from `tokenizer.chat_template` in the GGUF, or a built-in by name, or a raw
jinja string given as an override. Templates emit `bos_token` as text; `encode_chat` parses
it as the control token and adds BOS itself only when the template did not, so the prompt
starts with exactly one BOS.

A template is compiled when it is resolved (at load): one that does not compile, or that uses
include/import/extends, raises ChatTemplateLoadError naming where it came from. Rendering is
bounded in time (`render_timeout_s`) and size (`max_output_chars`); past either it raises
ChatTemplateRenderError, the server's fault. A bad conversation, or a template calling
`raise_exception`, raises ChatTemplateError, the client's (see chat_template_sandbox).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.ext import loopcontrols

from .chat_template_sandbox import (
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_RENDER_TIMEOUT_S,
    BoundedSandbox,
    ChatTemplateLoadError,
    ChatTemplateRenderError,
    compile_template,
    render_bounded,
)

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

# DeepSeek-V2(-Lite)-Chat's tokenizer_config.json template; llama.cpp's DEEPSEEK_2 renderer.
DEEPSEEK2_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# DeepSeek-V3's chat format, as llama.cpp's DEEPSEEK_3 renderer emits plain chats, plus tool
# calls in DeepSeek's V3 syntax: `tools` listed after BOS, assistant `tool_calls` as
# <｜tool▁calls▁begin｜> blocks (``function<｜tool▁sep｜>NAME`` and fenced JSON arguments), and runs
# of `tool` messages as one <｜tool▁outputs▁begin｜> block. A plain chat renders exactly as before.
DEEPSEEK3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools is defined and tools %}"
    "{{ '## Tools\n\nYou may call the functions below. To call them, answer with '"
    "'<｜tool▁calls▁begin｜>, then per call <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME, a '"
    "'```json block of arguments and <｜tool▁call▁end｜>, and end with '"
    "'<｜tool▁calls▁end｜>.\n\n' }}"
    "{% for tool in tools %}{% set fn = tool['function'] if tool['function'] is defined "
    "else tool %}{{ '### ' + fn['name'] + '\n' }}"
    "{% if fn['description'] is defined and fn['description'] %}"
    "{{ fn['description'] + '\n' }}{% endif %}"
    "{% if fn['parameters'] is defined %}{{ 'Parameters: ' + (fn['parameters'] | tojson) + '\n' }}"
    "{% endif %}{{ '\n' }}{% endfor %}{% endif %}"
    "{% set ns = namespace(outputs=false) %}"
    "{% for message in messages %}"
    "{% if ns.outputs and message['role'] != 'tool' %}{{ '<｜tool▁outputs▁end｜>' }}"
    "{% set ns.outputs = false %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] }}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<｜tool▁calls▁begin｜>' }}{% for call in message['tool_calls'] %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{% set args = call['function']['arguments'] %}"
    "{{ '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + call['function']['name'] + '\n```json\n' }}"
    "{{ args if args is string else (args | tojson) }}{{ '\n```<｜tool▁call▁end｜>' }}"
    "{% endfor %}{{ '<｜tool▁calls▁end｜>' }}{% endif %}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if not ns.outputs %}{{ '<｜tool▁outputs▁begin｜>' }}{% set ns.outputs = true %}"
    "{% else %}{{ '\n' }}{% endif %}"
    "{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "deepseek2": DEEPSEEK2_TEMPLATE,
    "deepseek3": DEEPSEEK3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
}


__all__ = [
    "BUILTIN_TEMPLATES", "DEFAULT_MAX_OUTPUT_CHARS", "DEFAULT_RENDER_TIMEOUT_S", "ChatTemplate",
    "ChatTemplateError", "ChatTemplateLoadError", "ChatTemplateRenderError", "encode_chat",
    "normalize_messages",
]


class ChatTemplateError(ValueError):
    """A bad conversation, or a template that called raise_exception: the client's fault."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers replaces jinja's tojson, which HTML-escapes, with plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment(max_chars: int) -> BoundedSandbox:
    return BoundedSandbox(
        max_chars, filters={"tojson": _tojson},
        globals={"raise_exception": _raise_exception, "strftime_now": _strftime_now},
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
    )


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate roles and content; flatten OpenAI text-part lists into one string."""
    if not messages:
        raise ChatTemplateError("messages is empty: a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"message {i}: unknown role {role!r} (expected one of {ROLES})")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""  # an assistant turn that only calls tools
        if content is None:
            raise ChatTemplateError(f"message {i} ({role}) has no content")
        if not isinstance(content, str):
            content = join_text_parts(content, i)
        out.append({**message, "content": content})
    return out


def join_text_parts(parts: Any, index: int) -> str:
    """The one rule for OpenAI content parts: text parts joined with "\n" (as llama.cpp does
    for templates that take string content); any other part is refused."""
    if not isinstance(parts, list):
        raise ChatTemplateError(f"message {index}: content must be a string or a list of parts")
    texts = []
    for part in parts:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise ChatTemplateError(f"message {index}: only text content parts are supported")
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"message {index}: text part without a 'text' string")
        texts.append(part["text"])
    return "\n".join(texts)


@dataclass
class ChatTemplate:
    """A jinja chat template plus the special-token strings it may reference; compiled here,
    so that a broken template is found at load."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    name: str | None = None  # built-in name, or None for a template from a file or string
    extra_context: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # where `source` came from, for errors; default from `name`
    render_timeout_s: float = DEFAULT_RENDER_TIMEOUT_S
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.origin:
            self.origin = f"built-in chat template {self.name!r}" if self.name else "chat template"
        if not self.render_timeout_s > 0 or self.max_output_chars <= 0:
            raise ChatTemplateLoadError(
                f"{self.origin}: render_timeout_s ({self.render_timeout_s}) and "
                f"max_output_chars ({self.max_output_chars}) must be positive")
        env = _environment(self.max_output_chars)
        self._compiled = compile_template(env, self.source, self.origin)

    @classmethod
    def resolve(
        cls, tokenizer: Tokenizer, override: str | None = None, *,
        render_timeout_s: float = DEFAULT_RENDER_TIMEOUT_S,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> ChatTemplate:
        """`override` (a built-in name or jinja text), else the file's, else a built-in;
        compiled now (ChatTemplateLoadError if it cannot be used)."""
        def token(i: int | None) -> str:
            return tokenizer.id_to_token(i) if i is not None else ""

        def make(source: str, name: str | None, origin: str = "") -> ChatTemplate:
            return cls(source, bos, eos, name, origin=origin, render_timeout_s=render_timeout_s,
                       max_output_chars=max_output_chars)

        bos, eos = token(tokenizer.bos_id), token(tokenizer.eos_id)
        if override:
            if override in BUILTIN_TEMPLATES:
                return make(BUILTIN_TEMPLATES[override], override)
            if "{{" not in override and "{%" not in override:
                known = ", ".join(BUILTIN_TEMPLATES)
                raise ChatTemplateLoadError(
                    f"unknown chat template {override!r}: neither a built-in name (one of: "
                    f"{known}) nor jinja text")
            return make(override, None, "the chat_template override (--chat-template)")
        if tokenizer.chat_template:
            return make(tokenizer.chat_template, None,
                        f"the GGUF's tokenizer.chat_template in {tokenizer.source}")
        name = "deepseek3" if tokenizer.pre == "deepseek-v3" else "deepseek2"
        return make(BUILTIN_TEMPLATES[name], name)

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any,
    ) -> str:
        """The prompt text. ChatTemplateError (a ValueError) for a bad conversation or the
        template's raise_exception; ChatTemplateRenderError past a bound or on a crash.

        ``tools`` (OpenAI's request list) is the template's ``tools`` variable, as transformers
        passes it; left undefined when None, so ``tools is defined`` tells a template."""
        context = {
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            **self.extra_context, **kwargs,
            "messages": normalize_messages(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        if tools is not None:
            context["tools"] = list(tools)
        try:
            return render_bounded(self._compiled, context, self.render_timeout_s,
                                  self.max_output_chars)
        except ChatTemplateRenderError:
            raise
        except jinja2.TemplateError as e:  # undefined values, sandbox refusals: as today
            raise ChatTemplateError(f"chat template failed: {e}") from e
        except ValueError:  # ChatTemplateError from raise_exception among them
            raise
        except Exception as e:  # a crash in the template (TypeError, RecursionError, ...)
            raise ChatTemplateRenderError(
                f"{self.origin} failed: {type(e).__name__}: {e}") from e


def encode_chat(
    tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Prompt ids for a conversation, with BOS exactly once when the vocabulary wants it."""
    text = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    ids = tokenizer.encode(text, add_bos=False, parse_special=True)
    bos = tokenizer.bos_id
    if tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids
