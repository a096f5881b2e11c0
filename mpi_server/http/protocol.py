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


def _json_unicode(value: Any) -> Any:
    if find_surrogate(value):
        raise ValueError(SURROGATE_MESSAGE)
    return value


Text = Annotated[str, AfterValidator(_unicode)]
JSONValue = Annotated[Any, AfterValidator(_json_unicode)]  # any JSON, all strings Unicode
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Request(BaseModel):
    # Unknown fields (user, metadata, store, ...) are accepted and ignored, as llama.cpp does,
    # so clients that send harmless extras keep working. Fields that would change what the
    # client gets, and that this server does not implement, are declared below as
    # `Unsupported` and refused with a 400 naming them (`unsupported_fields`).
    model_config = ConfigDict(extra="ignore")


Unsupported = Any  # declared so that it is not dropped with the ignored extras

# field -> (values that ask for nothing this server lacks, what to do instead)
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "functions": ((None, []), "use 'tools'"),
    "function_call": ((None, "none", "auto"), "use 'tool_choice'"),
    "audio": ((None,), "this server generates text only"),
    "modalities": ((None, ["text"]), "this server generates text only"),
    "prediction": ((None,), "predicted outputs are not implemented"),
    "web_search_options": ((None,), "web search is not implemented"),
    "reasoning_effort": ((None,), "reasoning effort cannot be set for these models"),
    "best_of": ((None, 1), "send n requests instead"),
    "suffix": ((None, ""), "insertion (suffix) is not implemented"),
    "mirostat": ((None, 0), "mirostat sampling is not implemented"),
    "typical_p": ((None, 1, 1.0), "typical sampling is not implemented"),
    "tfs_z": ((None, 1, 1.0), "tail-free sampling is not implemented"),
    "dynatemp_range": ((None, 0, 0.0), "dynamic temperature is not implemented"),
    "xtc_probability": ((None, 0, 0.0), "XTC sampling is not implemented"),
    "dry_multiplier": ((None, 0, 0.0), "DRY sampling is not implemented"),
    "top_n_sigma": ((None, -1, -1.0), "top-n-sigma sampling is not implemented"),
    "samplers": ((None,), "the sampler order is fixed"),
}


def unsupported_fields(body: BaseModel) -> tuple[str, str] | None:
    """(field, why) of the first declared-unsupported field the request actually uses."""
    for name in UNSUPPORTED:
        if name in type(body).model_fields:
            value = getattr(body, name)
            harmless, why = UNSUPPORTED[name]
            if not any(value == h and type(value) is type(h) for h in harmless):
                return name, why
    return None


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
    # structured outputs (every generating endpoint; llama.cpp takes all three everywhere)
    response_format: Annotated[dict[str, Any] | None, AfterValidator(_json_unicode)] = None
    json_schema: JSONValue = None  # llama.cpp: a raw JSON schema
    grammar: Text | None = None  # llama.cpp: GBNF
    # llama.cpp samplers this server does not have
    mirostat: Unsupported = None
    typical_p: Unsupported = None
    tfs_z: Unsupported = None
    dynatemp_range: Unsupported = None
    xtc_probability: Unsupported = None
    dry_multiplier: Unsupported = None
    top_n_sigma: Unsupported = None
    samplers: Unsupported = None


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
    tools: Annotated[list[dict[str, Any]] | None, AfterValidator(_json_unicode)] = None
    tool_choice: Annotated[str | dict[str, Any] | None, AfterValidator(_json_unicode)] = None
    parallel_tool_calls: bool | None = None
    functions: Unsupported = None
    function_call: Unsupported = None
    audio: Unsupported = None
    modalities: Unsupported = None
    prediction: Unsupported = None
    web_search_options: Unsupported = None
    reasoning_effort: Unsupported = None


Prompt = Text | list[int] | list[Text] | list[list[int]]


class CompletionRequest(SamplingFields):
    model: Text | None = None
    prompt: Prompt = Field(...)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None  # legacy: number of top alternatives per token
    echo: bool = False
    max_completion_tokens: int | None = None
    best_of: Unsupported = None
    suffix: Unsupported = None
