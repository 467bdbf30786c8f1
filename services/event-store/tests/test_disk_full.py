"""A full disk under the embedded ClickHouse: the ingest cannot store, reads of what it has not
stored answer 503 (never a short page), and once space returns it catches up with nothing lost
or doubled."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import ConversationCreated, EventSource, ThinkAction, encode_event
from taskbus.contracts.queries import (
    ConversationReply,
    EventPage,
    GetConversation,
    QueryError,
    SearchEvents,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.devtools.small_disk import SmallDiskUnavailable, fill, small_disk
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.query_client import QueryClient

from .conftest import WaitUntil


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    try:
        # Room for the store as migrated (migration 7 copies the events table) and the parts a
        # loaded machine has not merged yet: at 64 MB a CI run found it full before the filler.
        with small_disk(tmp_path_factory.mktemp("small-disk"), "256m") as mounted:
            yield mounted
    except SmallDiskUnavailable as unavailable:
        pytest.skip(f"{unavailable} (root needed)")


@pytest.fixture(scope="module")
async def clickhouse(disk: Path) -> AsyncIterator[ClickHouse]:
    """This module's chDB lives on the small disk."""
    database = await ClickHouse.connect(f"chdb://{disk}/clickhouse", query_connections=2)
    await database.migrate()
    yield database
    await database.close()


async def test_a_full_chdb_disk_holds_reads_at_503_then_catches_up_exactly(
    event_store: Ingester,
    disk: Path,
    module_js: JetStreamContext,
    queries: QueryClient,
    wait_until: WaitUntil,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cid, user = uuid.uuid4().hex, "disk"
    appender = EventAppender(module_js)
    created = ConversationCreated(
        conversation_id=cid,
        source=EventSource.USER,
        user_id=user,
        title="full",
        spec=ConversationSpec(),
    )
    created = await appender.append(created)
    await wait_until(event_store.caught_up, "the conversation's creation")

    filler = fill(disk)
    try:
        thoughts = [
            ThinkAction(conversation_id=cid, source=EventSource.AGENT, thought=f"t{n}" * 2000)
            for n in range(20)
        ]
        thoughts = await appender.append_all(thoughts)  # the log has room; ClickHouse none
        behind = await queries.ask(
            GetConversation(user_id=user, conversation_id=cid), ConversationReply
        )
        assert isinstance(behind, QueryError) and behind.status == 503, behind
        assert not await event_store.caught_up()

        async def refused() -> bool:  # the ingest's insert, refused and retried
            return "NOT_ENOUGH_SPACE" in caplog.text

        await wait_until(refused, "the ingest's insert to be refused for space")
    finally:
        filler.unlink()

    await wait_until(event_store.caught_up, "the ingest to store what waited")
    page = await queries.ask(SearchEvents(user_id=user, conversation_id=cid, limit=100), EventPage)
    assert isinstance(page, EventPage), page
    # Every event once, in order, and each as appended.
    assert [bytes(raw) for raw in page.events] == [encode_event(e) for e in [created, *thoughts]], [
        msgspec.json.decode(raw)["id"] for raw in page.events
    ]
