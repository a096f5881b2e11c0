"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from llama_mpi.models.tokenizer import chat_template
from llama_mpi.mpi_server.http import openai_format as fmt
from llama_mpi.mpi_server.http import serving
from llama_mpi.mpi_server.http import structured as so
from llama_mpi.mpi_server.http.errors import APIError, bad_request
from llama_mpi.mpi_server.http.generation import Generation
from llama_mpi.mpi_server.http.limits import check_text_length
from llama_mpi.mpi_server.http.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from llama_mpi.mpi_server.http.sampling import pick_max_tokens
from llama_mpi.mpi_server.http.sse import DONE, EventStream, sse
from llama_mpi.mpi_server.http.state import ServerState, get_state

router = APIRouter()


class _NeverRaised(Exception):
    pass


# A server-side fault while rendering (the template timed out, or its output is too large):
# 500, not the client's fault. Errors the template raises itself stay ValueError -> 400.
ChatTemplateRenderError: type[Exception] = getattr(
    chat_template, "ChatTemplateRenderError", _NeverRaised)


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "llama-mpi",
            "meta": {"n_ctx": state.max_model_len, "n_vocab": state.vocab_size}}
    return {"object": "list", "data": [card]}


def _message_dict(m: ChatMessage, i: int) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):  # content parts: only text can reach a text-only model
        try:
            content = chat_template.join_text_parts(content, i)
        except chat_template.ChatTemplateError as exc:
            raise bad_request(f"messages[{i}].content: {exc}", "messages") from exc
    return {**(m.model_extra or {}), "role": m.role, "content": content}


def _text_chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(m["content"]) for m in messages if isinstance(m["content"], str))


async def _chat_ids(request: Request, state: ServerState, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The rendered, tokenized chat; a chat whose texts alone cannot fit is not rendered."""
    check_text_length(_text_chars(messages), state.max_model_len, "messages")
    assert state.chat_to_ids is not None
    args: tuple[Any, ...] = (messages,) if tools is None else (messages, tools)
    try:
        return await serving.off_loop(request, state, state.chat_to_ids, *args)
    except ChatTemplateRenderError as exc:
        raise APIError(500, f"The chat template could not be rendered: {exc}",
                       type="server_error", code="chat_template_error") from exc
    except ValueError as exc:
        raise bad_request(f"messages: {exc}", "messages") from exc


def _fields(body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    return body.model_dump(exclude={"messages", "prompt", "stream_options", "tools",
                                    "response_format", "json_schema"})


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> Any:
    serving.admit(state, body)
    if not body.messages:
        raise bad_request("messages: must contain at least one message", "messages")
    spec = so.format_spec(body)
    plan = so.tool_plan(body, state)
    if spec is not None and plan.forced:
        raise bad_request("tool_choice: cannot force a tool call together with a "
                          f"{spec.field.split('.')[0]} constraint", param="tool_choice")
    messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
    prompt_ids = await _chat_ids(request, state, messages, plan.template_tools)
    thinking = (state.reasoning_format == "deepseek" or plan.forced) and so.opens_reasoning(
        state, prompt_ids)
    compiled = await so.compile_spec(
        request, state, spec or so.tool_spec(body, state, plan, thinking))
    fields = _fields(body)
    fields["top_logprobs"] = body.top_logprobs if body.logprobs else 0
    limit = pick_max_tokens(("max_completion_tokens", body.max_completion_tokens),
                            ("max_tokens", body.max_tokens), ("n_predict", body.n_predict))
    # the tool-call parser needs the markers, which are special tokens of DeepSeek vocabularies
    fields["skip_special_tokens"] = not (state.special or plan.parse)
    rid, created = fmt.new_id("chatcmpl"), fmt.now()
    gen = await serving.launch(request, state, prompt_ids, fields, limit, rid,
                               prompt_param="messages", constraint=compiled)
    reasoning = state.reasoning_format == "deepseek"

    def shaper() -> so.ReplyShaper:
        return so.ReplyShaper(reasoning, thinking, plan.parse)

    meta = (rid, created, state.model_name)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _chat_stream(state, gen, meta, messages, body.logprobs, usage, shaper)
        return EventStream(stream, on_close=gen.close)
    choices = await serving.collect(request, gen)
    if state.display_chat:
        serving.show_exchange(messages, choices)
    out = fmt.envelope(rid, "chat.completion", created, state.model_name, [
        _chat_choice(c, shaper(), body.logprobs) for c in choices])
    out["usage"] = fmt.usage(choices, len(prompt_ids))
    return out


def _chat_choice(c: Any, shaper: so.ReplyShaper, logprobs: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    reason = c.finish_reason
    if shaper.active:
        parts, calls = shaper.whole(c.text)
        message["content"] = parts.content if parts.content or not calls else None
        if parts.reasoning:
            message["reasoning_content"] = parts.reasoning
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        reason = so.finish_reason(reason, bool(calls))
    return {"index": c.index, "message": message,
            "logprobs": fmt.chat_logprobs(c.logprobs) if logprobs else None,
            "finish_reason": reason}


async def _chat_stream(
    state: ServerState, gen: Generation, meta: tuple[str, int, str], messages: list[Any],
    logprobs: bool, include_usage: bool, make_shaper: Any,
) -> AsyncIterator[bytes]:
    rid, created, model = meta
    shapers = [make_shaper() for _ in gen.choices]
    called = [False] * len(gen.choices)

    def chunk(choices: list[Any]) -> bytes:
        payload = fmt.envelope(rid, "chat.completion.chunk", created, model, choices)
        if include_usage:
            payload["usage"] = None  # OpenAI: null on every chunk but the last
        return sse(payload)

    def delta(c: Any, text: str, final: bool) -> dict[str, Any]:
        shaper = shapers[c.index]
        if not shaper.active:
            return {"content": text} if text else {}
        parts = shaper.feed(text) if text else so.MessageParts()
        if final:
            parts = parts + shaper.finish()
        called[c.index] = called[c.index] or bool(parts.tool_calls)
        return parts.delta()

    try:
        for c in gen.choices:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        async for c, out in gen.events():
            d = delta(c, out.new_text, out.finished)
            if d or out.logprobs:
                lp = fmt.chat_logprobs(out.logprobs) if logprobs and out.logprobs else None
                yield chunk([{"index": c.index, "delta": d, "logprobs": lp,
                              "finish_reason": None}])
            if out.finished:
                serving.raise_if_failed([c])
                reason = so.finish_reason(c.finish_reason, called[c.index])
                yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                              "finish_reason": reason}])
        if include_usage:
            payload = fmt.envelope(rid, "chat.completion.chunk", created, model, [])
            payload["usage"] = fmt.usage(gen.choices, len(gen.prompt_ids))
            yield sse(payload)
        if state.display_chat:
            serving.show_exchange(messages, gen.choices)
    except APIError as exc:  # headers are out: report in-band, as OpenAI does
        yield sse(exc.body())
    finally:
        await gen.close()
    yield DONE


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> Any:
    serving.admit(state, body)
    if body.echo:
        raise bad_request("echo: not supported", "echo")
    spec = so.format_spec(body)
    prompt_ids = await serving.prompt_to_ids(request, state, body.prompt)
    compiled = await so.compile_spec(request, state, spec)
    fields = _fields(body)
    fields["top_logprobs"] = body.logprobs or 0
    fields["logprobs"] = body.logprobs is not None
    limit = pick_max_tokens(("max_tokens", body.max_tokens), ("n_predict", body.n_predict),
                            ("max_completion_tokens", body.max_completion_tokens))
    rid, created = fmt.new_id("cmpl"), fmt.now()
    gen = await serving.launch(request, state, prompt_ids, fields, limit, rid,
                               constraint=compiled)
    meta = (rid, created, state.model_name)
    want_lp = body.logprobs is not None
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _completion_stream(state, gen, meta, body.prompt, want_lp, usage)
        return EventStream(stream, on_close=gen.close)
    choices = await serving.collect(request, gen)
    if state.display_chat:
        serving.show_exchange(body.prompt, choices)
    out = fmt.envelope(rid, "text_completion", created, state.model_name, [
        {"index": c.index, "text": c.text,
         "logprobs": fmt.legacy_logprobs(c.logprobs) if want_lp else None,
         "finish_reason": c.finish_reason}
        for c in choices
    ])
    out["usage"] = fmt.usage(choices, len(prompt_ids))
    return out


async def _completion_stream(
    state: ServerState, gen: Generation, meta: tuple[str, int, str], prompt: Any,
    logprobs: bool, include_usage: bool,
) -> AsyncIterator[bytes]:
    rid, created, model = meta
    offsets = [0] * len(gen.choices)  # text_offset continues across chunks

    def chunk(index: int, text: str, lp: Any, finish: str | None) -> bytes:
        payload = fmt.envelope(rid, "text_completion", created, model, [
            {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}])
        if include_usage:
            payload["usage"] = None
        return sse(payload)

    try:
        async for c, out in gen.events():
            lp = None
            if logprobs and out.logprobs:
                lp = fmt.legacy_logprobs(out.logprobs, offsets[c.index])
                offsets[c.index] += sum(len(x.text) for x in out.logprobs)
            if out.finished:
                serving.raise_if_failed([c])
            if out.new_text or lp is not None or out.finished:
                yield chunk(c.index, out.new_text, lp, c.finish_reason if out.finished else None)
        if include_usage:
            payload = fmt.envelope(rid, "text_completion", created, model, [])
            payload["usage"] = fmt.usage(gen.choices, len(gen.prompt_ids))
            yield sse(payload)
        if state.display_chat:
            serving.show_exchange(prompt, gen.choices)
    except APIError as exc:
        yield sse(exc.body())
    finally:
        await gen.close()
    yield DONE
