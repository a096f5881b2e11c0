"""Bounds on what one request may make the server hold or compute, checked before the work.

* The request body: at most ``max_request_bytes`` (auto: ``max(4 MiB, 64 * max_model_len)``),
  refused with 413 by :class:`BodyLimitMiddleware` before anything parses it, from the
  ``Content-Length`` header when there is one and by counting the bytes as they arrive (a
  chunked body, or one longer than its header said) otherwise.
* A text prompt: a prompt (or the message texts of a chat, or ``/tokenize`` content) of more
  than ``CHARS_PER_TOKEN * max_model_len`` characters is refused with the usual 400
  ``context_length_exceeded`` without tokenizing it. The rule: text averages 3-5 characters
  per token of DeepSeek's BPE vocabulary (prose and code alike); only long runs of one
  character (the vocabulary has pieces of up to 128 spaces or dashes) or special-token text
  average more. A prompt averaging over 16 characters a token is refused even though it
  might fit; anything else over the bound cannot fit, and tokenizing it (about 0.6 us a
  character, and tens of bytes of ids a character) is skipped.
* A token-id list: a prompt of ``max_model_len`` ids or more (``/detokenize``: more than
  ``max_model_len``) is refused before its ids are looked at.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama_mpi.mpi_server.http.errors import bad_request, error_body

MIN_BODY_BYTES = 4 << 20  # 4 MiB: room for a long chat however small the context is
BODY_BYTES_PER_TOKEN = 64  # JSON-escaped text of a token is rarely more than ~12 bytes
CHARS_PER_TOKEN = 16  # see the module docstring


def auto_body_limit(max_model_len: int) -> int:
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max(max_model_len, 0))


def max_prompt_chars(max_model_len: int) -> int:
    return CHARS_PER_TOKEN * max_model_len


def check_text_length(chars: int, max_model_len: int, param: str) -> None:
    """400 ``context_length_exceeded`` for a text that cannot fit, without tokenizing it."""
    if chars > max_prompt_chars(max_model_len):
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but {param} has "
            f"{chars} characters: more than {CHARS_PER_TOKEN} per token of context, so it "
            "cannot fit (it was not tokenized).",
            param=param,
            code="context_length_exceeded",
        )


def check_ids_length(n: int, max_model_len: int, param: str, *, prompt: bool = True) -> None:
    """400 ``context_length_exceeded`` for too many token ids: a prompt must leave room for
    one generated token; other lists (``/detokenize``) may fill the context."""
    if n > max_model_len - (1 if prompt else 0):
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but {param} has "
            f"{n} tokens.",
            param=param,
            code="context_length_exceeded",
        )


class BodyLimitMiddleware:
    """413 with an OpenAI error body for a request body over ``limit()`` bytes.

    The body is read here, up to the limit, and handed on in one piece only when it is
    complete: a refused body is never parsed, and at most ``limit`` bytes of it are held.
    ``limit`` is a callable so the automatic limit follows a context length that is only
    known once the model has loaded.
    """

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client left mid-body
                pending: Message | None = message
                break
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                chunks.clear()
                await _refuse(send, limit)
                return
            if body:
                chunks.append(body)
            if not message.get("more_body", False):
                pending = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        chunks.clear()

        async def replay() -> Message:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed one; counting still applies
    return None


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(error_body(
        f"Request body too large: the limit is {limit} bytes", "invalid_request_error",
        None, "request_too_large")).encode()
    await send({
        "type": "http.response.start",
        "status": 413,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})
