"""The FastAPI application: routers, auth, limits, error shape, request metrics."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from patchserve import __version__
from patchserve.server.errors import install_error_handlers, without_validation_422
from patchserve.server.logs import RequestIds
from patchserve.server.middleware import ApiKeyAndMetrics, BodyLimit
from patchserve.server.openapi import document_event_streams
from patchserve.server.routes import (
    completions,
    dashboard,
    info,
    sources,
    steering,
    study,
    sweep,
    text,
)
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
    for module in (sweep, study, sources, completions, steering, text, info, dashboard):
        app.include_router(module.router)
    # The dashboard (GET /) and its scripts: outside /v1, so they load without an API key.
    app.mount(dashboard.STATIC_PREFIX, dashboard.static_files(), name="dashboard")
    # The last added runs first: the key is checked before a byte of the body is read.
    app.add_middleware(BodyLimit, limit=state.config.max_body_bytes)
    app.add_middleware(ApiKeyAndMetrics, api_key=state.config.api_key, metrics=state.metrics)
    app.add_middleware(RequestIds)  # outermost: every log line of the request carries its id

    def openapi() -> dict:
        if app.openapi_schema is None:
            generated = without_validation_422(FastAPI.openapi(app))
            app.openapi_schema = document_event_streams(generated)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
