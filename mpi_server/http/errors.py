"""OpenAI-style error bodies, and the handlers that make every failure one of them."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    503: "unavailable_error",
}


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def has_surrogate(text: str) -> bool:
    """A lone UTF-16 surrogate: valid in JSON (``"\\ud800"``) but not Unicode; UTF-8 cannot
    encode it."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def printable(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX``, so an error message quoting a
    client's string can always be sent."""
    if not has_surrogate(text):
        return text
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class APIError(Exception):
    """Raised anywhere in a route; rendered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        message = printable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _default_type(status: int) -> str:
    if status >= 500:
        return _TYPE_BY_STATUS.get(status, "server_error")
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(exc: ValueError, default_param: str | None = None) -> APIError:
    """``ValueError("param: why")`` (the SamplingParams convention) -> 400 naming ``param``."""
    text = str(exc)
    head, sep, _ = text.partition(": ")
    param = head if sep and head.isidentifier() else default_param
    return bad_request(text, param=param)


def _validation_to_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"Malformed JSON body: {first.get('msg', '')}", code="json_invalid")
    # Of a union's per-branch errors, one from our own validators says the most.
    first = next((e for e in errors if e.get("type") == "value_error"), first)
    loc = [p for p in first.get("loc", ()) if p != "body"]
    # The field path up to the first union-branch name ("str", "function-after[...]") or dict
    # key; param stops at the first list index too.
    names: list[str] = []
    path: list[str] = []
    for part in loc:
        if isinstance(part, int):
            path.append(str(part))
            continue
        if not part.isidentifier() or part in _TYPE_NAMES:
            break
        path.append(part)
        if len(path) == len(names) + 1:
            names.append(part)
    param = ".".join(names) or None
    where = ".".join(path) or "body"
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        return bad_request(f"Missing required field: {where}", param=param, code="missing")
    return bad_request(f"Invalid value for {where}: {msg}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    # FastAPI answers 422 with its own shape; OpenAI clients expect 400 + {"error": ...}.
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_to_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()


class CatchAllMiddleware:
    """Turns an unexpected exception into a 500 error body instead of a crashed request.

    Starlette's own ``Exception`` handler re-raises after answering; this one does not, so a
    bug in one request is logged and the server keeps serving.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - last line of defence
            log.exception("unhandled error on %s", scope.get("path"))
            if started:
                return  # mid-stream: nothing sane to send; the connection just ends
            body = json.dumps(
                error_body(f"Internal server error: {type(exc).__name__}", "server_error")
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
