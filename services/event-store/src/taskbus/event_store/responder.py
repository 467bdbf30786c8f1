"""Answers the query subjects (core NATS request-reply, queue group `event_store`), each once
the ingest has caught up with the log as it was when the query arrived (`consistency`).

Each subject is a FastStream core subscriber with up to `_WORKERS_PER_SUBJECT` requests in
hand, so a slow search or a query held by the read barrier does not queue the others (the
ClickHouse pool bounds the work itself). The handler returns the reply's bytes and FastStream
sends them, as they are, to the request's reply subject, with headers of its own (correlation
id, trace context): hence the room left for them below max_payload.
"""

from __future__ import annotations

import asyncio
import logging
import typing

import msgspec
from faststream.nats import NatsBroker
from faststream.nats.subscriber.usecases import ConcurrentCoreSubscriber

from taskbus.contracts import subjects
from taskbus.contracts.broker import reply_limit, undecoded
from taskbus.contracts.queries import (
    ConversationReply,
    CostAnalytics,
    DurationAnalytics,
    EventKindCounts,
    EventReply,
    FailingCommands,
    GetConversation,
    GetEvent,
    ListConversations,
    Query,
    Reply,
    ResourceAnalytics,
    SearchEvents,
)
from taskbus.event_store import replies, search, sql
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.consistency import NotCaughtUp, ReadBarrier

log = logging.getLogger(__name__)

QUEUE_GROUP = "event_store"
# Requests one subject answers at once; a query may wait up to `read_wait_ms` at the barrier.
_WORKERS_PER_SUBJECT = 32

AnyQuery = (
    SearchEvents
    | GetEvent
    | GetConversation
    | ListConversations
    | CostAnalytics
    | DurationAnalytics
    | EventKindCounts
    | FailingCommands
    | ResourceAnalytics
)
QUERY_TYPES: tuple[type[Query], ...] = typing.get_args(AnyQuery)


class QueryResponder:
    """Declares one subscriber per query subject on a connected `broker`; they answer from
    `start` until `stop`."""

    def __init__(self, broker: NatsBroker, clickhouse: ClickHouse, barrier: ReadBarrier) -> None:
        self._broker = broker
        self._clickhouse = clickhouse
        self._barrier = barrier
        self._subscribers = [self._declare(query_type) for query_type in QUERY_TYPES]

    def _declare(self, query_type: type[Query]) -> ConcurrentCoreSubscriber:
        subject = subjects.query_subject(query_type.subject_name)
        decoder = msgspec.json.Decoder(query_type)
        subscriber = self._broker.subscriber(
            subject, queue=QUEUE_GROUP, max_workers=_WORKERS_PER_SUBJECT
        )

        async def respond(body: bytes) -> bytes:
            return await self._respond(subject, body, decoder)

        subscriber(respond, decoder=undecoded)
        return subscriber

    async def start(self) -> None:
        for subscriber in self._subscribers:
            await subscriber.start()

    async def stop(self) -> None:
        """Stop taking requests and let the ones in hand answer."""
        await asyncio.gather(*(subscriber.stop() for subscriber in self._subscribers))

    @property
    def _max_bytes(self) -> int:
        return reply_limit(self._broker)

    async def _respond(
        self, subject: str, body: bytes, decoder: msgspec.json.Decoder[Query]
    ) -> bytes:
        try:
            query = decoder.decode(body)
            last_id = await self._barrier.wait_for(query)
            reply = await self.answer(query, last_id)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            reply = replies.invalid_query(str(error))
        except NotCaughtUp as behind:
            log.warning("query on %s: %s", subject, behind)
            reply = replies.not_caught_up(self._barrier.wait_seconds)
        except Exception:
            log.exception("query on %s failed", subject)
            reply = replies.internal_error()
        return replies.encode_reply(reply, self._max_bytes)

    async def answer(self, query: Query, last_id: int | None) -> Reply:
        """The reply to `query`; `last_id`, the id of its conversation's last event as far as
        the read barrier saw, lets a search read only the ids its page can be in (`search`)."""
        select = self._clickhouse.select
        match query:
            case SearchEvents():
                return await self._search_events(query, last_id)
            case GetEvent():
                return await self._get_event(query)
            case GetConversation():
                return await self._get_conversation(query)
            case ListConversations():
                return await self._list_conversations(query)
            case CostAnalytics():
                return replies.cost_report(query, await select(sql.cost_analytics(query)))
            case DurationAnalytics():
                return replies.duration_report(await select(sql.duration_analytics(query)))
            case EventKindCounts():
                return replies.event_kind_report(await select(sql.event_kind_counts(query)))
            case FailingCommands():
                return replies.failing_commands_report(await select(sql.failing_commands(query)))
            case ResourceAnalytics():
                return replies.resource_report(await select(sql.resource_analytics(query)))
        raise TypeError(f"unsupported query {type(query).__name__}")

    async def _search_events(self, query: SearchEvents, last_id: int | None) -> Reply:
        rows = await search.search_events(self._clickhouse, query, last_id)
        if not rows and not await self._owns(query.user_id, query.conversation_id):
            return replies.conversation_not_found(query.conversation_id)
        events = [(row[0], row[1]) for row in rows]
        return replies.event_page(query, events, self._max_bytes)

    async def _get_event(self, query: GetEvent) -> Reply:
        rows = await self._clickhouse.select(
            sql.get_event(query.user_id, query.conversation_id, query.event_id)
        )
        if rows:
            return EventReply(event=msgspec.Raw(rows[0][0]))
        if not await self._owns(query.user_id, query.conversation_id):
            return replies.conversation_not_found(query.conversation_id)
        return replies.event_not_found(query.conversation_id, query.event_id)

    async def _get_conversation(self, query: GetConversation) -> Reply:
        found = await self._clickhouse.conversations(
            sql.get_conversation(query.user_id, query.conversation_id)
        )
        if not found:
            return replies.conversation_not_found(query.conversation_id)
        return ConversationReply(conversation=found[0])

    async def _list_conversations(self, query: ListConversations) -> Reply:
        try:
            after = replies.decode_cursor(query.page_id) if query.page_id is not None else None
        except replies.InvalidCursor as error:
            return replies.invalid_query(str(error))
        found = await self._clickhouse.conversations(sql.list_conversations(query, after))
        return replies.conversation_page(query, found, self._max_bytes)

    async def _owns(self, user_id: str, conversation_id: str) -> bool:
        return bool(await self._clickhouse.select(sql.get_conversation(user_id, conversation_id)))
