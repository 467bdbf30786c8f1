"""Builds the gateway (FastAPI app over one NATS connection) and runs it with uvicorn."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote

import uvicorn
from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from taskbus.contracts.config import settings_from_env
from taskbus.contracts.redaction import redact
from taskbus.gateway import analytics, rest, secrets_routes, websocket, workspace_routes
from taskbus.gateway.auth import ApiKeys
from taskbus.gateway.bus import Bus
from taskbus.gateway.limits import ConnectionLimiter, RateLimiter
from taskbus.gateway.openapi import install_msgspec_schemas
from taskbus.gateway.parameters import reject_unknown_query_parameters
from taskbus.gateway.problems import install_problem_handlers
from taskbus.gateway.settings import GatewaySettings
from taskbus.gateway.user_settings import SettingsPolicy

logger = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> FastAPI:
    """The ASGI app; it connects to NATS on startup and drains the connection on shutdown."""
    api_keys = ApiKeys.from_settings(settings.api_keys, settings.api_keys_file)
    if not api_keys:
        logger.warning("no API keys configured: every authenticated request will answer 401")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bus = await Bus.connect(
            settings.nats_url,
            wait_seconds=settings.request_timeout_seconds,
            stream_replicas=settings.stream_replicas,
        )
        app.state.bus = bus
        logger.info("gateway connected to NATS at %s", settings.nats_url)
        try:
            yield
        finally:
            await bus.close()

    # /docs and /redoc load Swagger UI and ReDoc from the gateway itself, never from a CDN:
    # the docs work offline and the browser fetches no third-party script (nor Swagger UI's
    # default online validator, switched off).
    app = FastAPIOffline(
        title="Taskbus",
        summary="Run AI coding-agent tasks: conversations, their commands and their events",
        version="0.1.0",
        swagger_ui_parameters={"validatorUrl": None},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_keys = api_keys
    app.state.settings_policy = SettingsPolicy.of(settings)
    app.state.create_rate = RateLimiter(settings.create_rate_per_minute, settings.create_burst)
    app.state.websocket_limit = ConnectionLimiter(settings.ws_max_per_user)
    install_problem_handlers(app)
    checked = [Depends(reject_unknown_query_parameters)]
    app.include_router(rest.router, dependencies=checked)
    app.include_router(analytics.router, dependencies=checked)
    app.include_router(workspace_routes.router, dependencies=checked)
    app.include_router(secrets_routes.router, dependencies=checked)
    app.include_router(websocket.router)
    install_msgspec_schemas(app)
    return app


class RedactApiKeys(logging.Filter):
    """Masks `api_key=` query values (WebSocket URLs) and every other credential `redact` knows
    (e.g. a repository URL with a token in a query string) in uvicorn's request lines, which
    are percent-encoded: they are decoded first so an encoded credential is seen."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(unquote(message))
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def run(settings: GatewaySettings | None = None) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then runs the lifespan shutdown (NATS drain)."""
    settings = settings or settings_from_env(GatewaySettings)
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactApiKeys())
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        lifespan="on",
    )
