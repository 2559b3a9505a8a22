"""ASGI middleware around every route: the API key, request metrics, the body-size limit.

Both are plain ASGI (not Starlette's ``BaseHTTPMiddleware``), so streamed
responses and the client's ``http.disconnect`` pass straight through to the
routes that watch for it.

``BodyLimit`` reads the request body before any route parses it, in the
chunks the server hands over, counting bytes: a declared ``Content-Length``
over the limit is answered 413 without reading a byte; a chunked (or lying)
body is read until it passes the limit, then answered 413 with
``Connection: close`` so the rest is never read. Memory held for a body is
therefore bounded by the limit. The body read is then replayed to the app.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patchserve.server.errors import error_response
from patchserve.server.state import Metrics


async def _reject(scope: Scope, receive: Receive, send: Send, message: str, code: int) -> None:
    response = error_response(message, code)
    response.headers["connection"] = "close"  # the unread rest of the body is not wanted
    await response(scope, receive, send)


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self, declared: int | None = None) -> str:
        size = "larger than that" if declared is None else f"{declared} bytes"
        return f"the request body limit is {self.limit} bytes; this body is {size}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit:
            await _reject(scope, receive, send, self._too_large(declared), 413)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _reject(scope, receive, send, self._too_large(), 413)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The whole body as one message, then the server's own messages (disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class ApiKeyAndMetrics:
    """``/v1`` routes need ``Authorization: Bearer KEY`` (with ``--api-key``); every
    answer is counted by route and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        if self.expected is None or not scope["path"].startswith("/v1"):
            return True
        given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: dict[str, Any] = {"code": 500}

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self._authorized(scope):
                await self.app(scope, receive, counted)
            else:
                message = "missing or invalid API key (Authorization: Bearer KEY)"
                await error_response(message, 401)(scope, receive, counted)
        finally:
            label = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route=label, status=str(status["code"])).inc()
