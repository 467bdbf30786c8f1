"""Builds and runs the event-store: ClickHouse schema, log ingest, status KV and the queries.

One FastStream broker per process carries the ingest's durable consumers (one per partition
this instance holds a lease of) and the query subscribers; everything else (KV, direct gets,
consumer info, purges) uses its connection.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from taskbus.contracts import subjects
from taskbus.contracts.broker import ServiceBroker, jetstream, service_broker
from taskbus.contracts.observability_health import Vitals
from taskbus.contracts.partitions import PartitionLeases, default_instance_id
from taskbus.contracts.streams import ensure_streams
from taskbus.event_store.clickhouse import ClickHouse, release_start_up_pages
from taskbus.event_store.consistency import ReadBarrier
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.purge import Purger, log_consumers
from taskbus.event_store.rebuild import ensure_not_running, rebuild
from taskbus.event_store.responder import QueryResponder
from taskbus.event_store.settings import EventStoreSettings
from taskbus.event_store.status_kv import ConversationStatusKV

log = logging.getLogger(__name__)


class EventStore:
    """One running event-store: start() wires everything, stop() takes it down in reverse.

    The ingest and the queries start themselves rather than through `broker.start()`: a
    partition is consumed only once its lease is held and its projection loaded from
    ClickHouse. The responder stops first, so the queries in hand are answered while the
    ingest still moves the barrier; then the leases are handed back (their consumers stopped
    first), so the other instances take the partitions at once rather than after a TTL."""

    def __init__(self, settings: EventStoreSettings) -> None:
        self._settings = settings
        self._broker: ServiceBroker | None = None
        self._clickhouse: ClickHouse | None = None
        self._ingester: Ingester | None = None
        self._leases: PartitionLeases | None = None
        self._purger: Purger | None = None
        self._responder: QueryResponder | None = None
        self._vitals: Vitals | None = None

    async def start(self) -> None:
        settings = self._settings
        self._clickhouse = await ClickHouse.connect(
            settings.clickhouse_dsn, settings.query_connections
        )
        await self._clickhouse.migrate()
        if released := release_start_up_pages():
            log.info("released chDB's start-up pages (%d MB advised)", released >> 20)
        self._broker = service_broker(settings.nats_url, "event-store")
        await self._broker.connect()
        js = jetstream(self._broker)
        await ensure_streams(js, settings.stream_replicas)
        status_kv = ConversationStatusKV(await js.key_value(subjects.CONVERSATIONS_BUCKET))
        self._purger = Purger(js, self._clickhouse, log_consumers(settings.consumer_name))
        self._ingester = Ingester(
            self._broker,
            self._clickhouse,
            status_kv,
            consumer_name=settings.consumer_name,
            batch_size=settings.batch_size,
            flush_interval=settings.flush_interval_ms / 1000,
            delay=settings.ingest_delay_ms / 1000,
            purger=self._purger,
            cache_size=settings.conversation_cache_size,
        )
        self._leases = PartitionLeases(
            await js.key_value(subjects.PARTITIONS_BUCKET),
            settings.consumer_name,
            settings.instance_id or default_instance_id(),
            on_acquired=self._ingester.acquired,
            on_lost=self._ingester.lost,
        )
        await self._leases.start()
        barrier = ReadBarrier(js, self._ingester, settings.read_wait_ms / 1000)
        self._responder = QueryResponder(self._broker, self._clickhouse, barrier)
        await self._responder.start()
        ingester = self._ingester
        self._vitals = Vitals(
            js,
            subjects.EVENT_STORE,
            instance=settings.instance_id or default_instance_id(),
            metrics_host=settings.metrics_host,
            metrics_port=settings.metrics_port,
            durables=lambda: [(subjects.EVENTS_STREAM, ingester.durable(p)) for p in ingester.held],
        )
        await self._vitals.ready()
        log.info("event-store ready (nats %s)", settings.nats_url)

    async def stop(self) -> None:
        if self._vitals is not None:
            await self._vitals.stop()
        if self._responder is not None:
            await self._responder.stop()
        if self._leases is not None:
            await self._leases.stop()
        if self._purger is not None:
            await self._purger.stop()
        if self._broker is not None:
            await self._broker.stop()  # drains the connection
        if self._clickhouse is not None:
            await self._clickhouse.close()
        log.info("event-store stopped")


async def run(settings: EventStoreSettings) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    event_store = EventStore(settings)
    try:
        await event_store.start()
        await stop.wait()
    finally:
        await event_store.stop()


async def run_rebuild(settings: EventStoreSettings) -> int:
    """Rebuild the read models from the log; refused while the event-store runs."""
    broker = service_broker(settings.nats_url, "event-store-rebuild")
    await broker.connect()
    try:
        js = jetstream(broker)
        await ensure_streams(js, settings.stream_replicas)
        await ensure_not_running(js, settings.consumer_name, settings.clickhouse_dsn)
        clickhouse = await ClickHouse.connect(settings.clickhouse_dsn, query_connections=1)
        try:
            return await rebuild(
                broker,
                clickhouse,
                consumer_name=settings.consumer_name,
                batch_size=settings.batch_size,
                flush_interval=settings.flush_interval_ms / 1000,
            )
        finally:
            await clickhouse.close()
    finally:
        await broker.stop()
