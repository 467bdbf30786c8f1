"""Read-your-writes in the event store: a query waits until the ingest has stored the log as it
stood when the query arrived, and says 503 (retry later) rather than answer short."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from faststream.nats import NatsBroker
from nats.aio.client import Client
from nats.js import JetStreamContext

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    ConversationCreated,
    ConversationStatusChanged,
    Event,
    EventSource,
    MessageAction,
)
from taskbus.contracts.queries import (
    ConversationPage,
    ConversationReply,
    EventPage,
    EventReply,
    GetConversation,
    GetEvent,
    ListConversations,
    QueryError,
    SearchEvents,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus
from taskbus.devtools.nats_server import NatsServer
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.consistency import ReadBarrier
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.query_client import QueryClient
from taskbus.event_store.responder import QueryResponder

USER = EventSource.USER
ENV = EventSource.ENVIRONMENT
# Much longer than a query takes: without the barrier every query below would answer first.
SLOW_BATCH_SECONDS = 1.0

StoreFactory = Callable[..., Awaitable[Ingester]]
WaitUntil = Callable[[Callable[[], Awaitable[bool]], str], Awaitable[None]]
SlowIngesterFactory = Callable[..., Awaitable[Ingester]]


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A log of this module's own: a fresh consumer replays the whole log, and a slow one
    would spend the test on other modules' events."""
    with NatsServer(tmp_path_factory.mktemp("read-barrier-nats")) as server:
        yield server.url


@pytest.fixture
async def slow_store(
    module_broker: NatsBroker,
    module_js: JetStreamContext,
    clickhouse: ClickHouse,
    start_ingester: SlowIngesterFactory,
) -> AsyncIterator[StoreFactory]:
    """Starts an ingester that pauses `delay` before each batch (`options`: more `Ingester`
    settings) and a responder behind a barrier bounded by `wait_seconds`; both stop with the
    test."""
    running: list[tuple[Ingester, QueryResponder]] = []

    async def start(delay: float, wait_seconds: float, **options: Any) -> Ingester:
        ingester = await start_ingester(None, delay, **options)
        responder = QueryResponder(
            module_broker, clickhouse, ReadBarrier(module_js, ingester, wait_seconds)
        )
        await responder.start()
        running.append((ingester, responder))
        return ingester

    yield start
    for ingester, responder in running:
        await responder.stop()
        await ingester.stop()


def conversation(user_id: str, cid: str, messages: int) -> list[Event]:
    return [
        ConversationCreated(
            conversation_id=cid, source=USER, user_id=user_id, title="t", spec=ConversationSpec()
        ),
        ConversationStatusChanged(
            conversation_id=cid, source=ENV, status=ConversationStatus.RUNNING
        ),
        *(
            MessageAction(conversation_id=cid, source=USER, content=f"message {n}")
            for n in range(messages)
        ),
    ]


async def test_queries_right_after_an_append_see_it_with_a_slow_ingest(
    slow_store: StoreFactory, module_js: JetStreamContext, queries: QueryClient
) -> None:
    await slow_store(SLOW_BATCH_SECONDS, 10.0)
    user_id, cid = f"ryw-{uuid.uuid4().hex[:8]}", f"ryw-{uuid.uuid4().hex[:10]}"
    appender = EventAppender(module_js)
    events = await appender.append_all(conversation(user_id, cid, 5))

    page = await queries.ask(SearchEvents(user_id=user_id, conversation_id=cid, limit=3), EventPage)
    assert isinstance(page, EventPage), page  # not 404: the conversation is there at once
    assert (len(page.events), page.has_more, page.next_start_id) == (3, True, 3)
    one = await queries.ask(
        GetEvent(user_id=user_id, conversation_id=cid, event_id=events[-1].id), EventReply
    )
    assert isinstance(one, EventReply), one

    more = await appender.append(
        MessageAction(conversation_id=cid, source=USER, content="one more")
    )
    reply = await queries.ask(
        GetConversation(user_id=user_id, conversation_id=cid), ConversationReply
    )
    assert isinstance(reply, ConversationReply), reply
    assert reply.conversation.last_event_id == more.id
    tail = await queries.ask(
        SearchEvents(user_id=user_id, conversation_id=cid, start_id=more.id), EventPage
    )
    assert isinstance(tail, EventPage) and len(tail.events) == 1 and not tail.has_more

    # Across conversations (a list): a conversation created a moment ago is listed.
    other = f"ryw-{uuid.uuid4().hex[:10]}"
    await appender.append_all(conversation(user_id, other, 0))
    listed = await queries.ask(ListConversations(user_id=user_id), ConversationPage)
    assert isinstance(listed, ConversationPage), listed
    assert {info.conversation_id for info in listed.conversations} == {cid, other}


async def test_a_query_the_ingest_cannot_catch_up_with_in_time_is_a_retryable_503(
    slow_store: StoreFactory, module_js: JetStreamContext, queries: QueryClient
) -> None:
    await slow_store(3.0, 0.3)
    user_id, cid = f"late-{uuid.uuid4().hex[:8]}", f"late-{uuid.uuid4().hex[:10]}"
    await EventAppender(module_js).append_all(conversation(user_id, cid, 2))
    for query in (
        SearchEvents(user_id=user_id, conversation_id=cid),
        GetEvent(user_id=user_id, conversation_id=cid, event_id=0),
        ListConversations(user_id=user_id),
    ):
        reply = await queries.ask(query, EventPage)
        assert isinstance(reply, QueryError), reply
        assert (reply.status, reply.kind, reply.retry_after_seconds) == (
            503,
            "store-catching-up",
            1,
        )


async def test_a_query_held_at_the_barrier_does_not_hold_up_the_others(
    slow_store: StoreFactory,
    module_js: JetStreamContext,
    queries: QueryClient,
    module_nc: Client,
    wait_until: WaitUntil,
) -> None:
    """Queries on one subject are answered side by side: one waiting for a slow ingest leaves
    the next, whose conversation is stored, to answer at once."""
    ingester = await slow_store(SLOW_BATCH_SECONDS * 2, 10.0)
    user_id = f"side-{uuid.uuid4().hex[:8]}"
    stored, waiting = f"side-{uuid.uuid4().hex[:10]}", f"side-{uuid.uuid4().hex[:10]}"
    appender = EventAppender(module_js)
    await appender.append_all(conversation(user_id, stored, 1))
    await wait_until(ingester.caught_up, "the first conversation to be stored")
    behind = await appender.append_all(conversation(user_id, waiting, 3))

    # It waits for up to two slow batches and a write, which a busy machine can stretch past
    # the default 5 s of a request: it may wait as long as the barrier does.
    patient = QueryClient(module_nc, timeout=15.0)
    held = asyncio.create_task(
        patient.ask(GetConversation(user_id=user_id, conversation_id=waiting), ConversationReply)
    )
    await asyncio.sleep(0.2)  # the held query is at the barrier before the next one arrives
    started = time.monotonic()
    answered = await queries.ask(
        GetConversation(user_id=user_id, conversation_id=stored), ConversationReply
    )
    took = time.monotonic() - started
    assert isinstance(answered, ConversationReply), answered
    assert not held.done(), "the held query should still wait for the slow ingest"
    assert took < SLOW_BATCH_SECONDS, f"queued behind the held query ({took:.2f} s)"
    reply = await held
    assert isinstance(reply, ConversationReply), reply
    assert reply.conversation.last_event_id == behind[-1].id
    assert ingester.conversations[waiting].last_event_id == behind[-1].id


async def test_a_query_does_not_wait_out_the_pause_between_writes(
    slow_store: StoreFactory,
    module_js: JetStreamContext,
    queries: QueryClient,
    wait_until: WaitUntil,
) -> None:
    """Under load the ingest pauses between writes (up to a second) so that events gather; a
    query waiting for the ingest ends the pause at once. Here every write is followed by the
    longest pause: without the cut, each round below would take about a second."""
    ingester = await slow_store(0.0, 10.0, write_share=1e-6)
    await wait_until(ingester.caught_up, "the replay of the module's log")
    user_id, cid = f"pause-{uuid.uuid4().hex[:8]}", f"pause-{uuid.uuid4().hex[:10]}"
    appender = EventAppender(module_js)
    await appender.append_all(conversation(user_id, cid, 0))
    rounds = 5
    started = time.monotonic()
    for n in range(rounds):
        said = await appender.append(
            MessageAction(conversation_id=cid, source=USER, content=f"round {n}")
        )
        reply = await queries.ask(
            GetEvent(user_id=user_id, conversation_id=cid, event_id=said.id), EventReply
        )
        assert isinstance(reply, EventReply), reply
    took = time.monotonic() - started
    assert took < rounds * 0.5, f"{rounds} rounds took {took:.2f} s: the queries waited"
