"""The Prometheus metrics every service shares (events appended, consumer lag) and the small
HTTP listener that serves `/metrics` for the services without an HTTP server of their own.

Each service's own metrics live in its `metrics` module, next to nothing else; all go to
`prometheus_client`'s default registry, which FastStream's middleware (contracts.broker) fills
with its per-subject message counts and durations too. Label values are bounded (event kinds,
durable names), never a conversation id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, start_http_server

logger = logging.getLogger(__name__)

EVENTS_APPENDED = Counter(
    "taskbus_events_appended", "Events this process appended to the log", ["kind"]
)
CONSUMER_PENDING = Gauge(
    "taskbus_consumer_pending",
    "Messages a durable consumer of this process has yet to receive (num_pending, sampled)",
    ["stream", "durable"],
)
CONSUMER_ACK_PENDING = Gauge(
    "taskbus_consumer_ack_pending",
    "Messages delivered to a durable consumer of this process and not yet acked (sampled)",
    ["stream", "durable"],
)

LAG_SAMPLE_SECONDS = 5.0

Durables = Callable[[], Iterable[tuple[str, str]]]


async def sample_consumer_lag(js: JetStreamContext, durables: Durables) -> None:
    """Every `LAG_SAMPLE_SECONDS` until cancelled: the lag of each (stream, durable) this
    process consumes now (`durables` is asked each time: partitions come and go)."""
    sampled: set[tuple[str, str]] = set()
    while True:
        current = set(durables())
        for gone in sampled - current:  # a partition handed over is another instance's lag
            CONSUMER_PENDING.remove(*gone)
            CONSUMER_ACK_PENDING.remove(*gone)
        sampled &= current
        for stream, durable in sorted(current):
            try:
                info = await js.consumer_info(stream, durable)
            except (NotFoundError, nats.errors.Error, TimeoutError) as error:
                logger.debug("lag of %s not sampled: %r", durable, error)
                continue
            CONSUMER_PENDING.labels(stream, durable).set(info.num_pending or 0)
            CONSUMER_ACK_PENDING.labels(stream, durable).set(info.num_ack_pending or 0)
            sampled.add((stream, durable))
        await asyncio.sleep(LAG_SAMPLE_SECONDS)


class MetricsListener:
    """`/metrics` on `host:port` in a daemon thread (prometheus_client's server); port 0 takes
    any free port (`port` says which). No authentication: bind it where only the scraper
    reaches (loopback by default)."""

    def __init__(self, host: str, port: int) -> None:
        self._server: WSGIServer
        self._server, _ = start_http_server(port, addr=host)
        self.port: int = self._server.server_port
        logger.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
