"""Two event-store processes share the log's partitions through leases: together they ingest
every event exactly once, and when one is killed -9 the other takes its partitions within the
lease bound and ingests what comes after.

Each process has its own chDB store (a chDB path has one owner; no ClickHouse server runs
here), so each holds, and answers for, only what it ingested itself: the test says so rather
than hiding it. With a ClickHouse server both would read one store.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import ConversationCreated, Event
from taskbus.contracts.partitions import (
    LEASE_SECONDS,
    PARTITIONS,
    RENEW_SECONDS,
    PartitionLeases,
    partition_of,
)
from taskbus.contracts.queries import (
    ConversationReply,
    EventPage,
    GetConversation,
    QueryError,
    SearchEvents,
)
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.sql import Statement
from taskbus.event_store.synthetic import users_history

from .test_service_process import EventStoreProcess, ask, is_deleted

# A dead instance's lease expires (TTL), then the survivor's next round takes it; plus slack
# for a loaded machine.
HANDOVER_BOUND_SECONDS = LEASE_SECONDS + 2 * RENEW_SECONDS + 3.0


class _EventId(msgspec.Struct):
    id: int


_id_decoder = msgspec.json.Decoder(_EventId)


async def poll(condition: Callable[[], Awaitable[bool]], what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def lease_owners(js: JetStreamContext, group: str) -> dict[int, str | None]:
    """Who holds each partition's lease now (read through the leases' own API, never started)."""

    async def ignore(_: frozenset[int]) -> None:
        return None

    observer = PartitionLeases(
        await js.key_value(subjects.PARTITIONS_BUCKET),
        group,
        "observer",
        on_acquired=ignore,
        on_lost=ignore,
    )
    return {p: await observer.owner(p) for p in range(PARTITIONS)}


async def ingested(js: JetStreamContext, consumer_name: str) -> bool:
    """Every partition's durable exists and has stored and acked all the log holds of it."""
    for partition in range(PARTITIONS):
        try:
            info = await js.consumer_info(
                subjects.EVENTS_STREAM, subjects.event_store_durable(partition, consumer_name)
            )
        except nats.js.errors.NotFoundError:
            return False
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def append(js: JetStreamContext, seed: int, tag: str, prefix: str) -> list[list[Event]]:
    planned = users_history(
        random.Random(seed),
        [f"u{n}{tag}" for n in range(3)],
        8,
        datetime(2025, 6, 1, tzinfo=UTC),
        max_steps=8,
        id_prefix=f"{prefix}{tag}",
    )
    appender = EventAppender(js)
    return list(await asyncio.gather(*(appender.append_all(events) for events in planned)))


async def served_ids(nc: Client, user_id: str, cid: str) -> list[int] | None:
    """The conversation's event ids as the answering instance serves them; None: 404."""
    ids: list[int] = []
    start = 0
    while True:
        page = await ask(
            nc, SearchEvents(user_id=user_id, conversation_id=cid, start_id=start, limit=100)
        )
        if isinstance(page, QueryError) and page.status == 404:
            return None
        assert isinstance(page, EventPage), page
        ids += [_id_decoder.decode(event).id for event in page.events]
        if not page.has_more or page.next_start_id is None:
            return ids
        start = page.next_start_id


async def stored_rows(data_dir: Path, cids: set[str]) -> list[tuple[str, int]]:
    """(conversation, event id) of every stored row, merged or not (no FINAL): a duplicate
    insert would show twice. The instance must be stopped (a chDB path has one owner)."""
    clickhouse = await ClickHouse.connect(f"chdb://{data_dir}", query_connections=1)
    try:
        rows = await clickhouse.select(Statement("SELECT conversation_id, id FROM events", {}))
    finally:
        await clickhouse.close()
    return [(cid, event_id) for cid, event_id in rows if cid in cids]


async def test_two_instances_split_the_partitions_and_the_survivor_takes_over(
    nats_url: str, tmp_path: Path, nc: Client, js: JetStreamContext
) -> None:
    tag = uuid.uuid4().hex[:6]
    group = f"event_store_split_{tag}"
    a = EventStoreProcess(nats_url, tmp_path / "a" / "clickhouse", group, instance_id="a")
    b = EventStoreProcess(nats_url, tmp_path / "b" / "clickhouse", group, instance_id="b")
    for instance in (a, b):
        instance.data_dir.parent.mkdir(parents=True)
    a.start()
    b.start()
    try:

        async def split() -> bool:
            owners = await lease_owners(js, group)
            return None not in owners.values() and set(owners.values()) == {"a", "b"}

        await poll(split, "the two instances to split the partitions", 60)
        owners_before = await lease_owners(js, group)
        before = await append(js, 1, tag, "split")
        await poll(lambda: ingested(js, group), "both instances to ingest the log", 60)

        b.kill()  # -9, with nothing in hand: every event so far is acked
        killed_at = time.monotonic()

        async def a_holds_all() -> bool:
            return set((await lease_owners(js, group)).values()) == {"a"}

        await poll(a_holds_all, "the survivor to take every partition", 2 * HANDOVER_BOUND_SECONDS)
        handover = time.monotonic() - killed_at
        print(f"partition hand-over after kill -9: {handover:.1f} s")
        assert handover <= HANDOVER_BOUND_SECONDS

        after = await append(js, 2, tag, "after")
        await poll(lambda: ingested(js, group), "the survivor to ingest what came after", 60)

        # Only the survivor answers now: everything it ingested, complete and in order; what
        # the dead instance stored is in the dead instance's chDB, not here.
        for events in [*before, *after]:
            if is_deleted(events):
                continue
            created = events[0]
            assert isinstance(created, ConversationCreated)
            cid = created.conversation_id
            ids = await served_ids(nc, created.user_id, cid)
            if events in after or owners_before[partition_of(cid)] == "a":
                assert ids == [event.id for event in events], cid
                reply = await ask(nc, GetConversation(user_id=created.user_id, conversation_id=cid))
                assert isinstance(reply, ConversationReply)
                assert reply.conversation.last_event_id == events[-1].id
            else:
                assert ids is None, f"{cid} was stored by the dead instance only"
        assert a.stop() == 0
    finally:
        a.kill()
        b.kill()

    logged = {
        (events[0].conversation_id, event.id)
        for events in [*before, *after]
        if not is_deleted(events)
        for event in events
    }
    kept = {cid for cid, _ in logged}
    rows_a = await stored_rows(a.data_dir, kept)
    rows_b = await stored_rows(b.data_dir, kept)
    assert len(rows_a) == len(set(rows_a)) and len(rows_b) == len(set(rows_b)), "a row twice"
    assert not set(rows_a) & set(rows_b), "an event ingested by both instances"
    assert set(rows_a) | set(rows_b) == logged
    # Each stored exactly its own partitions' share.
    assert {cid for cid, _ in rows_b} == {
        events[0].conversation_id
        for events in before
        if not is_deleted(events) and owners_before[partition_of(events[0].conversation_id)] == "b"
    }
