"""The ingest's conversation cache is bounded: past its size the least recently ingested
conversations are dropped, and their next events are folded from ClickHouse's row, exactly as
if they had stayed in memory."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from nats.js import JetStreamContext

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    ConversationCreated,
    ConversationStatusChanged,
    EventSource,
    LLMMetrics,
)
from taskbus.contracts.queries import ConversationReply, GetConversation
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.query_client import QueryClient
from taskbus.event_store.sql import Statement

from .conftest import WaitUntil

CACHE_SIZE = 3


@pytest.fixture(scope="module")
def ingest_options() -> dict[str, Any]:
    return {"cache_size": CACHE_SIZE}


def _created(cid: str) -> ConversationCreated:
    return ConversationCreated(
        conversation_id=cid, source=EventSource.USER, user_id="lru", title=cid,
        spec=ConversationSpec(),
    )  # fmt: skip


def _cost(cid: str, total: float) -> LLMMetrics:
    return LLMMetrics(
        conversation_id=cid, source=EventSource.AGENT, model="m", cost=0.25, accumulated_cost=total
    )


async def test_an_evicted_conversation_folds_on_from_clickhouse(
    event_store: Ingester,
    clickhouse: ClickHouse,
    module_js: JetStreamContext,
    queries: QueryClient,
    wait_until: WaitUntil,
) -> None:
    # The log so far first (other modules' conversations): replayed after `first`, they would
    # push it out before the test looks.
    await wait_until(event_store.caught_up, "the replay of the log so far")
    appender = EventAppender(module_js)
    first = f"lru-first-{uuid.uuid4().hex[:6]}"
    # Two batches, so ClickHouse holds two rows of it (merges stopped): the lookup must take
    # the one that has seen the most events.
    await clickhouse.select(Statement("SYSTEM STOP MERGES conversations", {}))
    await appender.append_all([_created(first)])
    await wait_until(event_store.caught_up, "the first conversation")
    await appender.append_all([_cost(first, 0.25)])
    await wait_until(event_store.caught_up, "the first conversation's cost")
    assert event_store.conversations[first].event_count == 2
    others = [f"lru-{i}-{uuid.uuid4().hex[:6]}" for i in range(CACHE_SIZE + 2)]
    for cid in others:  # one after another: `first` becomes the least recently ingested
        await appender.append_all([_created(cid)])
        await wait_until(event_store.caught_up, cid)
    assert first not in event_store.conversations  # dropped from memory
    assert len(event_store.conversations) <= CACHE_SIZE

    running = ConversationStatusChanged(
        conversation_id=first, source=EventSource.ENVIRONMENT, status=ConversationStatus.RUNNING
    )
    await appender.append_all([_cost(first, 0.5), running])
    await wait_until(event_store.caught_up, "the evicted conversation's new events")

    folded = event_store.conversations[first]  # looked up on the miss, then folded on
    assert folded.event_count == 4 and folded.last_event_id == 3
    assert folded.accumulated_cost == pytest.approx(0.5)
    assert folded.status is ConversationStatus.RUNNING and folded.title == first
    reply = await queries.ask(
        GetConversation(user_id="lru", conversation_id=first), ConversationReply
    )
    assert isinstance(reply, ConversationReply) and reply.conversation == folded
    await clickhouse.select(Statement("SYSTEM START MERGES conversations", {}))
