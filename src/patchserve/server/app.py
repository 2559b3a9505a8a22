"""The FastAPI application: routers, auth, limits, error shape, request metrics."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline

from patchserve import __version__
from patchserve.server.errors import error_response, install_error_handlers, without_validation_422
from patchserve.server.routes import completions, dashboard, info, sources, steering, sweep, text
from patchserve.server.state import ServerState


def create_app(state: ServerState) -> FastAPI:
    # FastAPIOffline: /docs and /redoc load their scripts from the package, not a CDN.
    app = FastAPIOffline(
        title="patchserve",
        version=__version__,
        description="Activation patching (causal tracing) for transformer language models.",
    )
    app.state.patchserve = state
    install_error_handlers(app)
    for module in (sweep, sources, completions, steering, text, info, dashboard):
        app.include_router(module.router)
    # The dashboard (GET /) and its scripts: outside /v1, so they load without an API key.
    app.mount(dashboard.STATIC_PREFIX, dashboard.static_files(), name="dashboard")

    key = state.config.api_key
    limit = state.config.max_body_bytes

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if key is not None and path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error_response("missing or invalid API key (Authorization: Bearer KEY)", 401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return error_response(f"request body is {length} bytes; the limit is {limit}", 413)
        response = await call_next(request)
        route = request.scope.get("route")
        label = getattr(route, "path", "unmatched")
        state.metrics.requests.labels(route=label, status=str(response.status_code)).inc()
        return response

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = without_validation_422(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
