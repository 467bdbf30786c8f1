"""Fixtures for the event-store tests: a chDB database per test module, and an ingester and
query responder running in-process on the session's nats-server."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
from faststream.nats import NatsBroker
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.broker import jetstream, service_broker
from taskbus.contracts.events import Event
from taskbus.contracts.streams import ensure_streams
from taskbus.devtools.nats_server import NatsServer
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.consistency import ReadBarrier
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.query_client import QueryClient
from taskbus.event_store.responder import QueryResponder
from taskbus.event_store.sql import Statement
from taskbus.event_store.status_kv import ConversationStatusKV
from taskbus.event_store.synthetic import users_history

WaitUntil = Callable[[Callable[[], Awaitable[bool]], str], Awaitable[None]]


async def _wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Generous: a loaded CI machine can starve the ingest for many seconds."""
    deadline = asyncio.get_running_loop().time() + 60.0
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def wait_until() -> WaitUntil:
    return _wait_until


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The event-store consumes the whole log, so its tests get a nats-server of their own
    rather than the workspace's shared one, where other suites leave their events."""
    with NatsServer(tmp_path_factory.mktemp("event-store-nats")) as server:
        yield server.url


@pytest.fixture(scope="module")
async def module_nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    await ensure_streams(client.jetstream())
    yield client
    await client.drain()


@pytest.fixture(scope="module")
def module_js(module_nc: Client) -> JetStreamContext:
    return module_nc.jetstream()


@pytest.fixture(scope="module")
async def module_broker(module_nc: Client, nats_url: str) -> AsyncIterator[NatsBroker]:
    """The FastStream broker the module's ingesters and responders run on, as the service's
    (a registry of its own: the metrics are per broker)."""
    broker = service_broker(nats_url, "event-store", registry=CollectorRegistry())
    await broker.connect()
    yield broker
    await broker.stop()


HTTP_URL_VARIABLE = "TASKBUS_TEST_CLICKHOUSE_URL"


@pytest.fixture(scope="module", params=["chdb", "http"])
async def clickhouse(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ClickHouse]:
    """The contract suite runs against every available backend, each module on a database of
    its own: embedded chDB always, a ClickHouse server when TASKBUS_TEST_CLICKHOUSE_URL names
    one (e.g. http://localhost:8123)."""
    if request.param == "chdb":
        # chDB allows one data path per process, so each module opens its own and closes it.
        path: Path = tmp_path_factory.mktemp("clickhouse")
        database = await ClickHouse.connect(f"chdb://{path}", query_connections=2)
        await database.migrate()
        yield database
        await database.close()
        return
    server_url = os.environ.get(HTTP_URL_VARIABLE)
    if not server_url:
        pytest.skip(f"{HTTP_URL_VARIABLE} is not set: no ClickHouse server to test against")
    name = f"taskbus_test_{uuid.uuid4().hex[:12]}"
    server = await ClickHouse.connect(server_url, query_connections=1)
    await server.select(Statement(f"CREATE DATABASE {name}", {}))
    database = await ClickHouse.connect(
        urlsplit(server_url)._replace(path=f"/{name}").geturl(), query_connections=2
    )
    await database.migrate()
    yield database
    await database.close()
    await server.select(Statement(f"DROP DATABASE {name} SYNC", {}))
    await server.close()


@pytest.fixture(scope="module")
def queries(module_nc: Client) -> QueryClient:
    return QueryClient(module_nc)


IngesterFactory = Callable[[str | None], Awaitable[Ingester]]


@pytest.fixture(scope="module")
def ingest_options() -> dict[str, Any]:
    """More `Ingester` settings for a module's ingesters (a module overrides it)."""
    return {}


@pytest.fixture(scope="module")
def start_ingester(
    module_broker: NatsBroker, clickhouse: ClickHouse, ingest_options: dict[str, Any]
) -> IngesterFactory:
    """Starts an ingester on the named durable consumer, by default a fresh one (which replays
    the whole log), pausing `delay` seconds before each batch (a slow ingest); `options` are
    more `Ingester` settings for this one."""

    async def start(consumer_name: str | None, delay: float = 0.0, **options: Any) -> Ingester:
        return await _start_ingester(
            module_broker, clickhouse, consumer_name, delay, **{**ingest_options, **options}
        )

    return start


async def _start_ingester(
    broker: NatsBroker,
    clickhouse: ClickHouse,
    consumer_name: str | None,
    delay: float = 0.0,
    **options: Any,
) -> Ingester:
    js = jetstream(broker)
    status_kv = ConversationStatusKV(await js.key_value(subjects.CONVERSATIONS_BUCKET))
    ingester = Ingester(
        broker,
        clickhouse,
        status_kv,
        consumer_name=consumer_name or f"event_store_test_{uuid.uuid4().hex[:10]}",
        batch_size=200,
        flush_interval=0.02,
        delay=delay,
        **options,
    )
    await ingester.start()
    return ingester


@pytest.fixture(scope="module")
async def event_store(
    module_broker: NatsBroker, clickhouse: ClickHouse, start_ingester: IngesterFactory
) -> AsyncIterator[Ingester]:
    """An in-process event-store (ingest + queries) over this module's database."""
    ingester = await start_ingester(None)
    barrier = ReadBarrier(jetstream(module_broker), ingester, wait_seconds=4.0)
    responder = QueryResponder(module_broker, clickhouse, barrier)
    await responder.start()
    yield ingester
    await responder.stop()
    await ingester.stop()


IngestHistory = Callable[..., Awaitable[list[list[Event]]]]


@pytest.fixture(scope="module")
def ingest_history(
    module_js: JetStreamContext, event_store: Ingester, wait_until: WaitUntil
) -> IngestHistory:
    """Append a generated history (`synthetic.users_history`) and wait until it is ingested;
    returns each conversation's events as appended (with their ids)."""

    async def ingest(
        seed: int, users: list[str], conversations: int, start: datetime, **options: Any
    ) -> list[list[Event]]:
        planned = users_history(random.Random(seed), users, conversations, start, **options)
        appender = EventAppender(module_js)
        appended = await asyncio.gather(*(appender.append_all(events) for events in planned))
        await wait_until(event_store.caught_up, "the ingest to catch up")
        return list(appended)

    return ingest
