"""Request bodies of the OpenAI-compatible endpoints (pydantic does the type checking)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # Unknown fields (user, tools, response_format, ...) are accepted and ignored, as
    # llama.cpp does, so clients that send extras keep working.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by every generating endpoint, with llama.cpp's aliases."""

    max_tokens: int | None = None
    n_predict: int | None = None  # llama.cpp; -1 means "until EOS / context limit"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    repeat_penalty: float | None = None  # llama.cpp spelling
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    n: int = 1


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... pass through to the template
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]] = Field(...)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None  # legacy: number of top alternatives per token
    echo: bool = False
    max_completion_tokens: int | None = None

