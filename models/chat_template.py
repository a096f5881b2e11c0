"""Chat templates: jinja2 rendering set up the way transformers' `apply_chat_template` does.

The template comes from `tokenizer.chat_template` in the GGUF, or a built-in by name, or a raw
jinja string given as an override. Templates emit `bos_token` as text; `encode_chat` parses
it as the control token and adds BOS itself only when the template did not, so the prompt
starts with exactly one BOS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

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

# The plain-chat core of DeepSeek-V3's template, as llama.cpp's DEEPSEEK_3 renderer emits it.
DEEPSEEK3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
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


class ChatTemplateError(ValueError):
    """A bad conversation, or a template that called raise_exception."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers replaces jinja's tojson, which HTML-escapes, with plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


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
        if content is None:
            raise ChatTemplateError(f"message {i} ({role}) has no content")
        if not isinstance(content, str):
            content = _join_text_parts(content, i)
        out.append({**message, "content": content})
    return out


def _join_text_parts(parts: Any, index: int) -> str:
    # llama.cpp joins text parts with "\n" for templates that take string content.
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
    """A jinja chat template plus the special-token strings it may reference."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    name: str | None = None  # built-in name, or None for a template from a file or string
    extra_context: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def _compiled(self) -> jinja2.Template:
        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from e

    @classmethod
    def resolve(cls, tokenizer: Tokenizer, override: str | None = None) -> ChatTemplate:
        """`override` (a built-in name or jinja text), else the file's, else a built-in."""
        def token(i: int | None) -> str:
            return tokenizer.id_to_token(i) if i is not None else ""

        bos, eos = token(tokenizer.bos_id), token(tokenizer.eos_id)
        if override:
            name = override if override in BUILTIN_TEMPLATES else None
            if name is None and "{{" not in override and "{%" not in override:
                known = ", ".join(BUILTIN_TEMPLATES)
                raise ChatTemplateError(f"unknown chat template {override!r} (built-in: {known})")
            source = BUILTIN_TEMPLATES[name] if name else override
            return cls(source, bos, eos, name)
        if tokenizer.chat_template:
            return cls(tokenizer.chat_template, bos, eos)
        name = "deepseek3" if tokenizer.pre == "deepseek-v3" else "deepseek2"
        return cls(BUILTIN_TEMPLATES[name], bos, eos, name)

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        context = {
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            **self.extra_context, **kwargs,
            "messages": normalize_messages(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled.render(**context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e


def encode_chat(
    tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
) -> list[int]:
    """Prompt ids for a conversation, with BOS exactly once when the vocabulary wants it."""
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    ids = tokenizer.encode(text, add_bos=False, parse_special=True)
    bos = tokenizer.bos_id
    if tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids
