"""Request bodies of the OpenAI-compatible endpoints (pydantic does the type checking).

Shared field types refuse, with a 400 naming the field, what JSON allows but no sampler or
encoder can use: NaN and infinite floats (``FiniteFloat``) and lone UTF-16 surrogates in
strings (``Text``; ``"\\ud800"`` is valid JSON but not Unicode, and UTF-8 cannot encode it).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from llama_mpi.mpi_server.http.errors import has_surrogate

SURROGATE_MESSAGE = "contains a lone UTF-16 surrogate, which is not valid Unicode"


def _unicode(text: str) -> str:
    if has_surrogate(text):
        raise ValueError(SURROGATE_MESSAGE)
    return text


def find_surrogate(value: Any) -> bool:
    """Whether any string (dict keys included) in a JSON value has a lone surrogate.

    Iterative, so a deeply nested value cannot exhaust the stack.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if has_surrogate(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


Text = Annotated[str, AfterValidator(_unicode)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Request(BaseModel):
    # Unknown fields (user, tools, response_format, ...) are accepted and ignored, as
    # llama.cpp does, so clients that send extras keep working.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by every generating endpoint, with llama.cpp's aliases.

    ``seed`` and ``logit_bias`` are range-checked in ``sampling.build_params``.
    """

    max_tokens: int | None = None
    n_predict: int | None = None  # llama.cpp; -1 means "until EOS / context limit"
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    top_k: int | None = None
    min_p: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    repeat_penalty: FiniteFloat | None = None  # llama.cpp spelling
    seed: int | None = None
    stop: Text | list[Text] | None = None
    logit_bias: dict[Text, float] | None = None
    ignore_eos: bool = False
    n: int = 1


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... pass through to the template
    role: Text
    content: Text | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _no_surrogates(self) -> ChatMessage:
        if find_surrogate(self.model_extra) or (
                isinstance(self.content, list) and find_surrogate(self.content)):
            raise ValueError(SURROGATE_MESSAGE)
        return self


class ChatCompletionRequest(SamplingFields):
    model: Text | None = None
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


Prompt = Text | list[int] | list[Text] | list[list[int]]


class CompletionRequest(SamplingFields):
    model: Text | None = None
    prompt: Prompt = Field(...)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None  # legacy: number of top alternatives per token
    echo: bool = False
    max_completion_tokens: int | None = None
