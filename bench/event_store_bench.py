"""Event-store benchmark: ingest rate and search_events page latency, printed as a table.

    uv run python bench/event_store_bench.py [--events 1000000] [--jetstream-events 100000]

1. Ingest, direct: realistic synthetic events (taskbus.event_store.synthetic) fed through the
   ingest's own per-event work (decode, status fold, row extraction) and inserts, in batches of
   the service's default size, into embedded chDB: no JetStream. Generating the events is not
   timed.
2. Ingest, end to end: the events are first published to JetStream (a nats-server from the
   wheel), then a real Ingester on a fresh durable consumer is timed from start until it has
   stored, projected (ClickHouse + KV) and acked every one of them.
3. search_events: 100-event pages of one conversation inside the 1M-event table, asked over
   NATS request-reply of the real QueryResponder (the gateway's path), and its SQL alone.
4. Analytics: each analytics query's SQL for one user's figures over that table.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry

from taskbus.contracts import subjects
from taskbus.contracts.broker import jetstream, service_broker
from taskbus.contracts.events import decode_event, encode_event
from taskbus.contracts.queries import (
    ConversationInfo,
    CostAnalytics,
    DurationAnalytics,
    EventKindCounts,
    EventPage,
    FailingCommands,
    SearchEvents,
)
from taskbus.contracts.streams import ensure_streams
from taskbus.contracts.summary import summarize
from taskbus.devtools.bench_report import print_table
from taskbus.devtools.nats_server import NatsServer
from taskbus.event_store import search, sql
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.consistency import ReadBarrier
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.query_client import QueryClient
from taskbus.event_store.responder import QueryResponder
from taskbus.event_store.rows import EventRow, event_row
from taskbus.event_store.settings import EventStoreSettings
from taskbus.event_store.status_kv import ConversationStatusKV
from taskbus.event_store.synthetic import conversation_history

BATCH_SIZE = EventStoreSettings().batch_size
USERS = 50
MAX_STEPS = 80  # about 100 events per conversation on average
CONVERSATIONS_AT_ONCE = 40  # interleaved in the log, as concurrent tasks are
T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Stored(msgspec.Struct, frozen=True):
    conversation_id: str
    event_id: int
    kind: str
    data: bytes


def log_stream(total: int, seed: int, prefix: str) -> Iterator[list[Stored]]:
    """Batches of the log (BATCH_SIZE events), conversations interleaved by timestamp."""
    rng = random.Random(seed)
    produced = 0
    conversation = 0
    pending: list[Stored] = []
    while produced < total:
        group = []
        for _ in range(CONVERSATIONS_AT_ONCE):
            # Random-looking like real ids, so no table part holds a narrow range of them;
            # the trailing number names the owner.
            cid = f"{rng.getrandbits(48):012x}-{prefix}-{conversation}"
            user = f"user-{conversation % USERS}"
            start = T0 + timedelta(minutes=rng.randint(0, 60 * 24 * 30))
            events = conversation_history(
                rng, cid, user, start, steps=rng.randint(0, MAX_STEPS), deleted=rng.random() < 0.1
            )
            group.append(
                [
                    (
                        e.timestamp,
                        Stored(cid, i, e.kind, encode_event(msgspec.structs.replace(e, id=i))),
                    )
                    for i, e in enumerate(events)
                ]
            )
            conversation += 1
        for _, stored in heapq.merge(*group, key=lambda item: item[0]):
            if produced == total:
                break
            pending.append(stored)
            produced += 1
            if len(pending) == BATCH_SIZE:
                yield pending
                pending = []
    if pending:
        yield pending


async def ingest_directly(clickhouse: ClickHouse, total: int) -> tuple[float, list[str]]:
    """Seconds spent ingesting `total` events (generation excluded) and the conversation ids."""
    conversations: dict[str, ConversationInfo] = {}
    spent = 0.0
    for batch in log_stream(total, seed=1, prefix="direct"):
        started = time.perf_counter()
        now = datetime.now(UTC)
        rows: list[EventRow] = []
        changed: dict[str, ConversationInfo] = {}
        for stored in batch:
            event = decode_event(stored.data)
            before = changed.get(stored.conversation_id) or conversations.get(
                stored.conversation_id
            )
            after = summarize(before, event)
            if after is not None and after is not before:
                changed[stored.conversation_id] = after
            rows.append(event_row(stored.data, event, after.user_id if after else "", now, now))
        await clickhouse.insert_events(rows)
        await clickhouse.upsert_conversations(list(changed.values()))
        conversations.update(changed)
        spent += time.perf_counter() - started
    return spent, list(conversations)


async def ingest_through_jetstream(nats_url: str, data: Path, total: int) -> float:
    broker = service_broker(nats_url, "bench", registry=CollectorRegistry())
    await broker.connect()
    js = jetstream(broker)
    await ensure_streams(js)
    for batch in log_stream(total, seed=2, prefix="e2e"):
        acks = [
            await js.publish_async(
                subjects.event_subject(stored.conversation_id, stored.kind),
                stored.data,
                headers={"Nats-Msg-Id": f"{stored.conversation_id}:{stored.event_id}"},
            )
            for stored in batch
        ]
        await asyncio.gather(*acks)
    clickhouse = await ClickHouse.connect(f"chdb://{data}", query_connections=1)
    await clickhouse.migrate()
    status_kv = ConversationStatusKV(await js.key_value(subjects.CONVERSATIONS_BUCKET))
    ingester = Ingester(
        broker,
        clickhouse,
        status_kv,
        consumer_name="bench",
        batch_size=BATCH_SIZE,
        flush_interval=0.1,
    )
    started = time.perf_counter()
    await ingester.start()
    while True:
        if await ingester.caught_up():
            break
        await asyncio.sleep(0.05)
    spent = time.perf_counter() - started
    await ingester.stop()
    count = (await clickhouse.select(sql.Statement("SELECT count() FROM events FINAL", {})))[0][0]
    assert count == total, f"stored {count} of {total}"
    await clickhouse.close()
    await broker.stop()
    return spent


def percentile(samples: list[float], level: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[level - 1]


async def search_latencies(
    nats_url: str, clickhouse: ClickHouse, conversation_ids: list[str], requests: int
) -> tuple[list[float], list[float]]:
    """(over NATS, bare SQL) latencies in ms of 100-event pages of random long conversations."""
    broker = service_broker(nats_url, "bench", registry=CollectorRegistry())
    nc = await broker.connect()
    # The real read barrier, as the service runs it: these conversations were ingested straight
    # into ClickHouse, so the log holds none of them and each query pays only the barrier's
    # look at the log (one direct get) before it is answered.
    js = jetstream(broker)
    await ensure_streams(js)
    ingester = Ingester(
        broker, clickhouse, None, consumer_name="bench", batch_size=1, flush_interval=1
    )
    responder = QueryResponder(broker, clickhouse, ReadBarrier(js, ingester, wait_seconds=5))
    await responder.start()
    client = QueryClient(nc)
    rng = random.Random(3)
    counted = await clickhouse.select(
        sql.Statement(
            "SELECT conversation_id, count() FROM events FINAL GROUP BY conversation_id", {}
        )
    )
    lengths: dict[str, int] = {cid: count for cid, count in counted}
    long_ones = [cid for cid in conversation_ids if lengths.get(cid, 0) > 150]
    owners = {cid: f"user-{int(cid.rsplit('-', 1)[1]) % USERS}" for cid in long_ones}
    over_nats: list[float] = []
    bare_sql: list[float] = []
    for n in range(requests + 20):  # the first 20 warm up
        cid = rng.choice(long_ones)
        query = SearchEvents(
            user_id=owners[cid],
            conversation_id=cid,
            start_id=rng.randint(0, lengths[cid] - 101),
            limit=100,
        )
        started = time.perf_counter()
        reply = await client.ask(query, EventPage)
        elapsed = time.perf_counter() - started
        assert isinstance(reply, EventPage) and len(reply.events) == 100, reply
        started = time.perf_counter()
        rows = await search.search_events(clickhouse, query, lengths[cid] - 1)
        sql_elapsed = time.perf_counter() - started
        assert len(rows) == 101
        if n >= 20:
            over_nats.append(elapsed * 1000)
            bare_sql.append(sql_elapsed * 1000)
    await responder.stop()
    await broker.stop()
    return over_nats, bare_sql


# Each analytics query's SQL for one user's figures.
ANALYTICS: dict[str, Callable[[str], sql.Statement]] = {
    "cost by day": lambda user: sql.cost_analytics(CostAnalytics(user_id=user)),
    "durations and outcomes": lambda user: sql.duration_analytics(DurationAnalytics(user_id=user)),
    "events per kind": lambda user: sql.event_kind_counts(EventKindCounts(user_id=user)),
    "top failing commands": lambda user: sql.failing_commands(FailingCommands(user_id=user)),
}
ANALYTICS_RUNS = 30


async def analytics_latencies(clickhouse: ClickHouse) -> dict[str, list[float]]:
    """Per analytics query, SQL latencies in ms over the whole table, users taken in turn (each
    owns 1/USERS of the events)."""
    latencies: dict[str, list[float]] = {}
    for name, statement_for in ANALYTICS.items():
        samples = latencies[name] = []
        for n in range(ANALYTICS_RUNS + 3):  # the first 3 warm up
            statement = statement_for(f"user-{n % USERS}")
            started = time.perf_counter()
            rows = await clickhouse.select(statement)
            elapsed = time.perf_counter() - started
            assert rows, name
            if n >= 3:
                samples.append(elapsed * 1000)
    return latencies


async def main(total: int, jetstream_total: int, requests: int) -> None:
    with tempfile.TemporaryDirectory(prefix="taskbus-bench-") as tmp:
        root = Path(tmp)
        clickhouse = await ClickHouse.connect(f"chdb://{root / 'direct'}", query_connections=2)
        await clickhouse.migrate()
        print(f"ingesting {total:,} events directly (batches of {BATCH_SIZE}) ...", flush=True)
        direct_seconds, conversation_ids = await ingest_directly(clickhouse, total)
        with NatsServer(root / "nats") as server:
            print(f"searching {requests} pages over NATS ...", flush=True)
            over_nats, bare_sql = await search_latencies(
                server.url, clickhouse, conversation_ids, requests
            )
            print(f"analytics, {ANALYTICS_RUNS} runs of each query ...", flush=True)
            analytics = await analytics_latencies(clickhouse)
            await clickhouse.close()
            print(f"ingesting {jetstream_total:,} events through JetStream ...", flush=True)
            e2e_seconds = await ingest_through_jetstream(server.url, root / "e2e", jetstream_total)
    rows = [
        ("ingest, direct insert path", f"{total:,} events", f"{total / direct_seconds:,.0f} ev/s"),
        (
            "ingest, JetStream -> ClickHouse + KV",
            f"{jetstream_total:,} events",
            f"{jetstream_total / e2e_seconds:,.0f} ev/s",
        ),
        (
            "search_events 100/page, NATS request",
            f"{requests} pages in {total:,}",
            f"p50 {percentile(over_nats, 50):.1f} ms, p99 {percentile(over_nats, 99):.1f} ms",
        ),
        (
            "search_events 100/page, SQL only",
            f"{requests} pages in {total:,}",
            f"p50 {percentile(bare_sql, 50):.1f} ms, p99 {percentile(bare_sql, 99):.1f} ms",
        ),
        *(
            (
                f"analytics: {name}, SQL",
                f"1 of {USERS} users in {total:,}",
                f"p50 {percentile(samples, 50):.1f} ms, p99 {percentile(samples, 99):.1f} ms",
            )
            for name, samples in analytics.items()
        ),
    ]
    print_table(("measure", "size", "result"), rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--jetstream-events", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=500)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.events, arguments.jetstream_events, arguments.requests))
