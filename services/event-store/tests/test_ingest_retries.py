"""An ingest that cannot store a batch keeps it and retries: the batch stays its own meanwhile
(in_progress: no other consumer instance gets it), and once ClickHouse takes it every event is
stored exactly once, with no gap."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator

import msgspec
import nats.errors
import pytest
from faststream.nats import NatsBroker
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    ConversationCreated,
    ConversationDeleted,
    ConversationStatusChanged,
    Event,
    EventSource,
    MessageAction,
)
from taskbus.contracts.partitions import partition_of
from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus
from taskbus.devtools.nats_server import NatsServer
from taskbus.event_store import ingest
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.purge import Purger
from taskbus.event_store.sql import Statement
from taskbus.event_store.status_kv import ConversationStatusKV

IngesterFactory = Callable[[str | None], Awaitable[Ingester]]
WaitUntil = Callable[[Callable[[], Awaitable[bool]], str], Awaitable[None]]
# The batch is renewed (in_progress) every quarter of this once its handler has it, after the
# 1 s fetch: a margin of about 2 s for a loaded CI worker's event loop.
ACK_WAIT_SECONDS = 4.0


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A log of this module's own: exactly-once is counted over everything the ingest stores."""
    with NatsServer(tmp_path_factory.mktemp("ingest-retries-nats")) as server:
        yield server.url


def conversation(cid: str, messages: int) -> list[Event]:
    source = EventSource.USER
    return [
        ConversationCreated(
            conversation_id=cid, source=source, user_id="u", title="t", spec=ConversationSpec()
        ),
        ConversationStatusChanged(
            conversation_id=cid, source=source, status=ConversationStatus.RUNNING
        ),
        *(
            MessageAction(conversation_id=cid, source=source, content=f"message {n}")
            for n in range(messages)
        ),
    ]


def in_hand(js: JetStreamContext, durable: str, count: int) -> Callable[[], Awaitable[bool]]:
    """Whether the durable's consumer holds the conversation's `count` events delivered and
    unacked, none left. At least: a new durable replays its whole partition, and another
    test's conversation may share it (a one-in-sixteen flake with `==` in CI)."""

    async def holding() -> bool:
        info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
        return bool(info.num_ack_pending >= count and info.num_pending == 0)

    return holding


async def assert_no_rival_is_handed_any(js: JetStreamContext, durable: str) -> None:
    """Another instance on the same durable gets nothing: the batch in hand is still ours."""
    rival = await js.pull_subscribe_bind(durable, stream=subjects.EVENTS_STREAM)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            stolen = await rival.fetch(1, timeout=1.0)
            pytest.fail(f"a rival was handed {stolen[0].subject}")
    finally:
        await rival.unsubscribe()


async def test_a_failing_insert_is_retried_and_stores_every_event_once(
    clickhouse: ClickHouse,
    module_js: JetStreamContext,
    module_broker: NatsBroker,
    wait_until: WaitUntil,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest, "_ACK_WAIT_SECONDS", ACK_WAIT_SECONDS)
    cid = f"retry-{uuid.uuid4().hex[:10]}"
    # Appended before the ingest starts, so its first fetch takes them all as one batch.
    events = await EventAppender(module_js).append_all(conversation(cid, 40))
    await clickhouse.select(Statement("SYSTEM STOP MERGES", {}))  # duplicates stay visible
    await clickhouse.select(Statement("RENAME TABLE events TO events_away", {}))  # inserts fail
    away = True
    try:
        # A flush interval long enough for one fetch to gather them all, so no event waits
        # unfetched in the client's queue, where nothing keeps it ours.
        ingester = Ingester(
            module_broker,
            clickhouse,
            ConversationStatusKV(await module_js.key_value(subjects.CONVERSATIONS_BUCKET)),
            consumer_name=f"event_store_test_{uuid.uuid4().hex[:10]}",
            batch_size=200,
            flush_interval=1.0,
        )
        await ingester.start()
        durable = ingester.durable(partition_of(cid))
        try:
            await wait_until(
                in_hand(module_js, durable, len(events)),
                "the ingest to take the whole log as one batch",
            )
            await asyncio.sleep(3 * ACK_WAIT_SECONDS)  # failing all along
            assert ingester.conversations.get(cid) is None  # nothing folded: nothing stored
            await assert_no_rival_is_handed_any(module_js, durable)

            await clickhouse.select(Statement("RENAME TABLE events_away TO events", {}))
            away = False
            await wait_until(ingester.caught_up, "the retried batch to be stored")
            info = await module_js.consumer_info(subjects.EVENTS_STREAM, durable)
            assert info.num_redelivered == 0
        finally:
            await ingester.stop()
        rows = await clickhouse.select(
            Statement(
                "SELECT id FROM events WHERE conversation_id = {cid:String} ORDER BY id",
                {"cid": cid},
            )
        )
        assert [row[0] for row in rows] == [event.id for event in events]  # no gap, none twice
        kv = await module_js.key_value(subjects.CONVERSATIONS_BUCKET)
        entry = await kv.get(cid)
        assert entry.value is not None
        projected = msgspec.json.decode(entry.value, type=ConversationInfo)
        assert (projected.last_event_id, projected.event_count) == (events[-1].id, len(events))
    finally:
        if away:
            await clickhouse.select(Statement("RENAME TABLE events_away TO events", {}))
        await clickhouse.select(Statement("SYSTEM START MERGES", {}))


async def test_a_write_slower_than_the_ack_wait_keeps_its_batch(
    clickhouse: ClickHouse,
    module_js: JetStreamContext,
    module_broker: NatsBroker,
    wait_until: WaitUntil,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch in hand is renewed however long its write takes: a slow ClickHouse (or a loaded
    host) must not see the batch redelivered while it is still being stored."""
    monkeypatch.setattr(ingest, "_ACK_WAIT_SECONDS", 2.0)
    cid = f"slow-{uuid.uuid4().hex[:10]}"
    events = await EventAppender(module_js).append_all(conversation(cid, 3))
    ingester = Ingester(
        module_broker,
        clickhouse,
        None,
        consumer_name=f"event_store_test_{uuid.uuid4().hex[:10]}",
        batch_size=200,
        # Long enough for one fetch to gather all five events on a loaded CI worker (a batch
        # split in two never has them all in hand at once), short against the ack wait.
        flush_interval=0.5,
        delay=8.0,  # before each batch: four ack waits
    )
    await ingester.start()
    durable = ingester.durable(partition_of(cid))
    try:
        await wait_until(in_hand(module_js, durable, len(events)), "the ingest to take the batch")
        await asyncio.sleep(4.0)  # two ack waits into the write
        await assert_no_rival_is_handed_any(module_js, durable)
        await wait_until(ingester.caught_up, "the slow batch to be stored")
        assert ingester.conversations[cid].event_count == len(events)
    finally:
        await ingester.stop()
    info = await module_js.consumer_info(
        subjects.EVENTS_STREAM, ingester.durable(partition_of(cid))
    )
    assert (info.num_redelivered, info.num_ack_pending) == (0, 0)


class FailingOncePurger(Purger):
    """Fails the first purge of `conversation_id` it is asked for (the ingest's last step,
    after every ack) and purges nothing."""

    def __init__(self, clickhouse: ClickHouse, js: JetStreamContext, conversation_id: str) -> None:
        super().__init__(js, clickhouse, lambda _: ())
        self._conversation_id = conversation_id
        self.asked = 0

    def schedule(self, deleted: ConversationInfo) -> None:
        if deleted.conversation_id == self._conversation_id:
            self.asked += 1
            if self.asked == 1:
                raise RuntimeError("purge scheduling failed")


async def test_a_batch_that_fails_after_its_acks_is_retried_without_acking_twice(
    clickhouse: ClickHouse,
    module_js: JetStreamContext,
    module_broker: NatsBroker,
    wait_until: WaitUntil,
) -> None:
    """The retry settles only what the failed attempt had not: acking a message twice raises,
    and would keep the batch failing for ever."""
    cid = f"deleted-{uuid.uuid4().hex[:10]}"
    events = await EventAppender(module_js).append_all(
        [
            *conversation(cid, 2),
            ConversationDeleted(conversation_id=cid, source=EventSource.USER, reason="test"),
        ]
    )
    purger = FailingOncePurger(clickhouse, module_js, cid)
    ingester = Ingester(
        module_broker,
        clickhouse,
        None,
        consumer_name=f"event_store_test_{uuid.uuid4().hex[:10]}",
        batch_size=200,
        flush_interval=0.02,
        purger=purger,
    )
    await ingester.start()
    try:

        async def retried() -> bool:  # acked by the first try, so wait for the second too
            return purger.asked >= 2 and await ingester.caught_up()

        await wait_until(retried, "the retried batch to be handled")
        assert ingester.conversations[cid].last_event_id == events[-1].id
        assert ingester.conversations[cid].status is ConversationStatus.ARCHIVED
    finally:
        await ingester.stop()
    assert purger.asked == 2  # failed, then asked again by the retry
    info = await module_js.consumer_info(
        subjects.EVENTS_STREAM, ingester.durable(partition_of(cid))
    )
    assert (info.num_redelivered, info.num_ack_pending) == (0, 0)
