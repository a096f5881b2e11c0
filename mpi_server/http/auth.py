"""Bearer-token check for every endpoint except ``/health`` (load balancers probe it)."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from llama_mpi.mpi_server.http.errors import error_body

OPEN_PATHS = frozenset({"/health"})


def key_matches(header: str | None, api_key: str) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant-time compare so the key cannot be guessed byte by byte from timings.
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if key_matches(header, self.api_key):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            error_body("Invalid API key", "invalid_request_error", None, "invalid_api_key")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
