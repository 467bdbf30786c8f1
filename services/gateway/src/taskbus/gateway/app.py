"""Builds the gateway (FastAPI app over one NATS connection) and runs it with uvicorn."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import uvicorn
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from taskbus.contracts import observability, subjects
from taskbus.contracts.config import settings_from_env
from taskbus.contracts.llm_endpoints import AllowList
from taskbus.gateway import (
    analytics,
    metrics,
    rest,
    secrets_routes,
    webhooks_routes,
    websocket,
    workspace_routes,
)
from taskbus.gateway.auth import ApiKeys
from taskbus.gateway.bus import Bus
from taskbus.gateway.limits import ConnectionLimiter, RateLimiter
from taskbus.gateway.openapi import install_msgspec_schemas
from taskbus.gateway.parameters import reject_unknown_query_parameters
from taskbus.gateway.problems import install_problem_handlers
from taskbus.gateway.settings import GatewaySettings
from taskbus.gateway.user_settings import SettingsPolicy
from taskbus.gateway.web_ui import install_web_ui
from taskbus.gateway.webhooks_delivery import WebhookDelivery
from taskbus.gateway.webhooks_store import WebhookStore

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
        app.state.webhook_store = await WebhookStore.open(bus.js)
        webhooks = await WebhookDelivery.start(
            settings, app.state.webhook_private_urls, app.state.settings_policy.box
        )
        try:
            yield
        finally:
            await webhooks.stop()
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
    app.state.webhook_private_urls = AllowList(settings.webhook_allowed_private_urls)
    app.state.create_rate = RateLimiter(settings.create_rate_per_minute, settings.create_burst)
    app.state.websocket_limit = ConnectionLimiter(settings.ws_max_per_user)
    metrics.count_websockets(app.state.websocket_limit)
    install_problem_handlers(app)
    checked = [Depends(reject_unknown_query_parameters)]
    app.include_router(rest.router, dependencies=checked)
    app.include_router(analytics.router, dependencies=checked)
    app.include_router(workspace_routes.router, dependencies=checked)
    app.include_router(secrets_routes.router, dependencies=checked)
    app.include_router(webhooks_routes.router, dependencies=checked)
    app.include_router(websocket.router)
    app.include_router(metrics.router)
    install_msgspec_schemas(app)
    install_web_ui(app)
    cors_origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    if cors_origins:
        # Bearer keys, never cookies: no credentialed requests; the headers clients send and read.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After"],
            max_age=600,
        )
    return app


def run(settings: GatewaySettings | None = None) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then runs the lifespan shutdown (NATS drain)."""
    settings = settings or settings_from_env(GatewaySettings)
    # JSON lines with credentials masked (uvicorn's request lines too: its loggers propagate).
    observability.setup(
        subjects.GATEWAY,
        msgspec.structs.replace(
            settings_from_env(observability.ObservabilitySettings), log_level=settings.log_level
        ),
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        lifespan="on",
        loop="uvloop",
        http="httptools",
    )
