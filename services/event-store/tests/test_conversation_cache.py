"""The ingest's conversation cache is bounded: past its size the least recently ingested
conversations are dropped, and their next events are folded from ClickHouse's row, exactly as
if they had stayed in memory."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from faststream.nats import NatsBroker
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.broker import jetstream
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
from taskbus.event_store.consistency import ReadBarrier
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.query_client import QueryClient
from taskbus.event_store.responder import QueryResponder
from taskbus.event_store.sql import Statement
from taskbus.event_store.status_kv import ConversationStatusKV

from .conftest import WaitUntil

CACHE_SIZE = 3


@pytest.fixture(scope="module")
async def small_cache(module_broker: NatsBroker, clickhouse: ClickHouse) -> AsyncIterator[Ingester]:
    js = jetstream(module_broker)
    ingester = Ingester(
        module_broker,
        clickhouse,
        ConversationStatusKV(await js.key_value(subjects.CONVERSATIONS_BUCKET)),
        consumer_name=f"event_store_lru_{uuid.uuid4().hex[:10]}",
        batch_size=200,
        flush_interval=0.02,
        cache_size=CACHE_SIZE,
    )
    await ingester.start()
    barrier = ReadBarrier(js, ingester, wait_seconds=4.0)
    responder = QueryResponder(module_broker, clickhouse, barrier)
    await responder.start()
    yield ingester
    await responder.stop()
    await ingester.stop()


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
    small_cache: Ingester,
    clickhouse: ClickHouse,
    module_js: JetStreamContext,
    queries: QueryClient,
    wait_until: WaitUntil,
) -> None:
    # The log so far first (other modules' conversations): replayed after `first`, they would
    # push it out before the test looks.
    await wait_until(small_cache.caught_up, "the replay of the log so far")
    appender = EventAppender(module_js)
    first = f"lru-first-{uuid.uuid4().hex[:6]}"
    # Two batches, so ClickHouse holds two rows of it (merges stopped): the lookup must take
    # the one that has seen the most events.
    await clickhouse.select(Statement("SYSTEM STOP MERGES conversations", {}))
    await appender.append_all([_created(first)])
    await wait_until(small_cache.caught_up, "the first conversation")
    await appender.append_all([_cost(first, 0.25)])
    await wait_until(small_cache.caught_up, "the first conversation's cost")
    assert small_cache.conversations[first].event_count == 2
    others = [f"lru-{i}-{uuid.uuid4().hex[:6]}" for i in range(CACHE_SIZE + 2)]
    for cid in others:  # one after another: `first` becomes the least recently ingested
        await appender.append_all([_created(cid)])
        await wait_until(small_cache.caught_up, cid)
    assert first not in small_cache.conversations  # dropped from memory
    assert len(small_cache.conversations) <= CACHE_SIZE

    running = ConversationStatusChanged(
        conversation_id=first, source=EventSource.ENVIRONMENT, status=ConversationStatus.RUNNING
    )
    await appender.append_all([_cost(first, 0.5), running])
    await wait_until(small_cache.caught_up, "the evicted conversation's new events")

    folded = small_cache.conversations[first]  # looked up on the miss, then folded on
    assert folded.event_count == 4 and folded.last_event_id == 3
    assert folded.accumulated_cost == pytest.approx(0.5)
    assert folded.status is ConversationStatus.RUNNING and folded.title == first
    reply = await queries.ask(
        GetConversation(user_id="lru", conversation_id=first), ConversationReply
    )
    assert isinstance(reply, ConversationReply) and reply.conversation == folded
    await clickhouse.select(Statement("SYSTEM START MERGES conversations", {}))
