"""A rebuild drops every table, replays the whole log and answers every query exactly as before."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec
import pytest
from faststream.nats import NatsBroker
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.events import ConversationCreated, Event, EventSource, ThinkAction
from taskbus.contracts.queries import (
    ConversationPage,
    CostAnalytics,
    CostGroupBy,
    CostReport,
    DurationAnalytics,
    DurationReport,
    EventKindCounts,
    EventKindReport,
    EventPage,
    FailingCommands,
    FailingCommandsReport,
    ListConversations,
    Query,
    Reply,
    SearchEvents,
)
from taskbus.contracts.status import ConversationStatus
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.query_client import QueryClient
from taskbus.event_store.rebuild import rebuild
from taskbus.event_store.rows import event_row
from taskbus.event_store.sql import MIGRATIONS, Statement

pytestmark = pytest.mark.usefixtures("event_store")

IngestHistory = Callable[..., Awaitable[list[list[Event]]]]
T0 = datetime(2025, 4, 1, tzinfo=UTC)


class History(msgspec.Struct):
    users: list[str]
    conversations: dict[str, list[Event]]  # conversation_id -> events as appended


@pytest.fixture(scope="module")
async def history(ingest_history: IngestHistory) -> History:
    tag = uuid.uuid4().hex[:6]
    users = [f"r{n}{tag}" for n in range(2)]
    appended = await ingest_history(11, users, 5, T0, max_steps=12, id_prefix=f"rb{tag}")
    return History(users=users, conversations={e[0].conversation_id: e for e in appended})


async def every_answer(queries: QueryClient, history: History) -> list[Reply]:
    """Every page of every query the event-store answers, for each user of the history."""
    answers: list[Reply] = []

    async def ask(query: Query, reply_type: type[Reply]) -> Reply:
        reply = await queries.ask(query, reply_type)
        assert isinstance(reply, reply_type), reply
        answers.append(reply)
        return reply

    for cid, events in history.conversations.items():
        user = events[0].user_id if isinstance(events[0], ConversationCreated) else ""
        for reverse in (False, True):
            query = SearchEvents(user_id=user, conversation_id=cid, limit=7, reverse=reverse)
            while True:
                page = await ask(query, EventPage)
                assert isinstance(page, EventPage)
                if page.next_start_id is None:
                    break
                position = "end_id" if reverse else "start_id"
                query = msgspec.structs.replace(query, **{position: page.next_start_id})
    for user in history.users:
        for exclude in ([], [ConversationStatus.ARCHIVED]):
            listing = ListConversations(user_id=user, limit=3, exclude_statuses=exclude)
            while True:
                conversations = await ask(listing, ConversationPage)
                assert isinstance(conversations, ConversationPage)
                assert not {c.status for c in conversations.conversations} & set(exclude)
                if conversations.next_page_id is None:
                    break
                listing = msgspec.structs.replace(listing, page_id=conversations.next_page_id)
        for group_by in CostGroupBy:
            await ask(CostAnalytics(user_id=user, group_by=group_by), CostReport)
        await ask(DurationAnalytics(user_id=user), DurationReport)
        await ask(EventKindCounts(user_id=user), EventKindReport)
        await ask(FailingCommands(user_id=user, limit=100), FailingCommandsReport)
    return answers


async def test_rebuild_reproduces_every_query_result(
    queries: QueryClient,
    clickhouse: ClickHouse,
    module_js: JetStreamContext,
    module_broker: NatsBroker,
    event_store: Ingester,
    history: History,
) -> None:
    before = await every_answer(queries, history)
    kv = await module_js.key_value(subjects.CONVERSATIONS_BUCKET)
    kv_before = {cid: await kv.get(cid) for cid in history.conversations}

    # A row the log does not hold: only a real drop of the tables makes it go away.
    cid, events = next(iter(history.conversations.items()))
    assert isinstance(events[0], ConversationCreated)
    ghost = ThinkAction(conversation_id=cid, source=EventSource.AGENT, id=10_000, thought="ghost")
    now = datetime.now(UTC)
    await clickhouse.insert_events(
        [event_row(msgspec.json.encode(ghost), ghost, events[0].user_id, now, now)]
    )
    ghost_count = Statement("SELECT count() FROM events WHERE id = 10000", {})
    assert (await clickhouse.select(ghost_count))[0][0] == 1

    await event_store.stop()  # a rebuild runs with the event-store stopped
    conversations = await rebuild(
        module_broker,
        clickhouse,
        consumer_name=f"event_store_rebuild_{uuid.uuid4().hex[:8]}",
        batch_size=500,
        flush_interval=0.02,
    )

    assert conversations >= len(history.conversations)  # the session's log holds others too
    assert (await clickhouse.select(ghost_count))[0][0] == 0
    after = await every_answer(queries, history)
    assert after == before
    statuses = [
        [info.status for info in page.conversations]
        for page in before
        if isinstance(page, ConversationPage)
    ]
    assert any(ConversationStatus.ARCHIVED in page for page in statuses), "deleted ones listed"
    for cid, entry in kv_before.items():
        rewritten = await kv.get(cid)
        assert rewritten.value == entry.value
        assert rewritten.revision is not None and entry.revision is not None
        assert rewritten.revision > entry.revision  # written again by the rebuild


async def test_reordering_events_by_user_keeps_every_query_result(
    queries: QueryClient, clickhouse: ClickHouse, history: History
) -> None:
    """Migration 2 on a store that version 1 made: same answers, new key, and safe to run again
    after an interruption (before its version was recorded)."""
    before = await every_answer(queries, history)
    await remake_events(clickhouse, "ORDER BY (conversation_id, id)")  # as version 1 made it
    await forget_migration(clickhouse, 2)
    assert "ORDER BY (conversation_id, id)" in await table_definition(clickhouse, "events")

    assert await clickhouse.migrate() == [2]
    assert "ORDER BY (user_id, conversation_id, id)" in await table_definition(clickhouse, "events")
    assert await every_answer(queries, history) == before

    (reorder,) = [migration for migration in MIGRATIONS if migration.version == 2]
    for statement in reorder.statements:
        await clickhouse.select(Statement(statement, {}))
    assert await every_answer(queries, history) == before
    tables = await clickhouse.select(Statement("SHOW TABLES", {}))
    assert {"events_by_user", "events_before_v2"}.isdisjoint(name for (name,) in tables)


async def test_events_in_small_granules_keep_every_query_result(
    queries: QueryClient, clickhouse: ClickHouse, history: History
) -> None:
    """Migration 7 on a store that version 6 made: same answers, granules of 256 rows, and safe
    to run again wherever an interrupted run stopped (copied; renamed but not dropped)."""
    before = await every_answer(queries, history)
    # As version 6 left it, in ClickHouse's default granules.
    await remake_events(clickhouse, "ORDER BY (user_id, conversation_id, id)")
    assert "index_granularity = 8192" in await table_definition(clickhouse, "events")

    (regranulate,) = [migration for migration in MIGRATIONS if migration.version == 7]
    for stopped_after in ("INSERT INTO", "RENAME TABLE"):
        for statement in regranulate.statements:
            await clickhouse.select(Statement(statement, {}))
            if statement.startswith(stopped_after):
                break
        await forget_migration(clickhouse, 7)
        assert await clickhouse.migrate() == [7]
        assert "index_granularity = 256" in await table_definition(clickhouse, "events")
        assert await every_answer(queries, history) == before
    tables = await clickhouse.select(Statement("SHOW TABLES", {}))
    assert {"events_v7", "events_before_v7"}.isdisjoint(name for (name,) in tables)


async def test_small_parts_are_packed_in_one_file_and_keep_every_query_result(
    queries: QueryClient, clickhouse: ClickHouse, history: History
) -> None:
    """Migration 8 (run again, on whatever `events` the tests above left): a new part of either
    table is one packed file, and every answer stays the same."""
    before = await every_answer(queries, history)
    await forget_migration(clickhouse, 8)
    assert await clickhouse.migrate() == [8]
    for table in ("events", "conversations"):
        assert "min_bytes_for_full_part_storage = 10485760" in await table_definition(
            clickhouse, table
        )
        # A copy of one row: a new part, collapsed by the table's key like any redelivery.
        await clickhouse.select(Statement(f"INSERT INTO {table} SELECT * FROM {table} LIMIT 1", {}))
        newest = await clickhouse.select(
            Statement(
                "SELECT part_storage_type FROM system.parts WHERE database = currentDatabase()"
                " AND table = {table:String} AND active ORDER BY modification_time DESC,"
                " max_block_number DESC LIMIT 1",
                {"table": table},
            )
        )
        assert newest == [("Packed",)]
    assert await every_answer(queries, history) == before


async def remake_events(clickhouse: ClickHouse, key: str) -> None:
    """`events` made anew with this key (and ClickHouse's default settings), holding the same
    rows: the table as an older migration left it."""
    for statement in (
        f"CREATE TABLE events_older AS events ENGINE = ReplacingMergeTree(ingested_at) {key}",
        "INSERT INTO events_older SELECT * FROM events",
        "RENAME TABLE events TO events_newer, events_older TO events",
        "DROP TABLE events_newer SYNC",
    ):
        await clickhouse.select(Statement(statement, {}))


async def forget_migration(clickhouse: ClickHouse, version: int) -> None:
    """As if the migration had not been recorded (an interrupted run)."""
    await clickhouse.select(
        Statement(
            f"ALTER TABLE schema_migrations DELETE WHERE version = {version}"
            " SETTINGS mutations_sync = 2",
            {},
        )
    )


async def table_definition(clickhouse: ClickHouse, table: str) -> str:
    ((definition,),) = await clickhouse.select(Statement(f"SHOW CREATE TABLE {table}", {}))
    return str(definition)
