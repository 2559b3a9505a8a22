"""The server's logs: one logger per package, every line tagged with its request's id.

Each request gets an id — the client's ``X-Request-Id`` when it sends a sane
one, else a fresh one — that is echoed in the response's ``X-Request-Id``
header and attached to every log record emitted while the request is handled
(``request_id``; ``-`` outside a request), so a 500 the client reports can be
found in the log with its traceback. ``configure(level)`` installs the format
once for the ``patchserve`` loggers (``patchserve.server``, ``patchserve.store``,
...) at ``--log-level``.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: ContextVar[str] = ContextVar("patchserve_request_id", default="-")
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure(level: str) -> None:
    """Log ``patchserve.*`` records to stderr at ``level``, each with its request id."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger("patchserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class RequestIds:
    """ASGI middleware: a request id per request, in the context and the response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"")
        text = given.decode("latin-1")
        request_id = text if _SANE.match(text) else uuid.uuid4().hex[:16]
        token = REQUEST_ID.set(request_id)

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            REQUEST_ID.reset(token)
