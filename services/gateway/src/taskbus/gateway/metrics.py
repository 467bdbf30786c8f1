"""The gateway's Prometheus metrics and its `/metrics` route.

`/metrics` needs no API key, like `/api/health`: it names no user, conversation or secret
(labels are subject families, event kinds and routes), and a scraper holds no key. Where the
gateway faces the internet, keep `/metrics` off the public route at the proxy.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from taskbus.gateway.limits import ConnectionLimiter

WEBSOCKET_CLIENTS = Gauge(
    "taskbus_websocket_clients", "WebSocket clients connected to this gateway process"
)

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def count_websockets(limiter: ConnectionLimiter) -> None:
    """The gauge reads `limiter`'s count at each scrape: one count, never two to keep equal."""
    WEBSOCKET_CLIENTS.set_function(lambda: limiter.total)
