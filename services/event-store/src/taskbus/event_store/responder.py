"""Answers the query subjects (core NATS request-reply, queue group `event_store`), each once
the ingest has caught up with the log as it was when the query arrived (`consistency`)."""

from __future__ import annotations

import asyncio
import logging
import typing

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from taskbus.contracts import subjects
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
from taskbus.event_store import replies, sql
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.consistency import NotCaughtUp, ReadBarrier

log = logging.getLogger(__name__)

QUEUE_GROUP = "event_store"

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
    def __init__(self, nc: Client, clickhouse: ClickHouse, barrier: ReadBarrier) -> None:
        self._nc = nc
        self._clickhouse = clickhouse
        self._barrier = barrier
        self._subscriptions: list[Subscription] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for query_type in QUERY_TYPES:
            decoder = msgspec.json.Decoder(query_type)

            async def on_request(msg: Msg, decoder: msgspec.json.Decoder[Query] = decoder) -> None:
                # Each request runs as its own task: a slow search does not queue the others.
                task = asyncio.create_task(self._respond(msg, decoder))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

            subscription = await self._nc.subscribe(
                subjects.query_subject(query_type.subject_name), queue=QUEUE_GROUP, cb=on_request
            )
            self._subscriptions.append(subscription)

    async def stop(self) -> None:
        """Stop taking requests and let the ones in flight answer."""
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions.clear()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _respond(self, msg: Msg, decoder: msgspec.json.Decoder[Query]) -> None:
        try:
            query = decoder.decode(msg.data)
            await self._barrier.wait_for(query)
            reply = await self.answer(query)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            reply = replies.invalid_query(str(error))
        except NotCaughtUp as behind:
            log.warning("query on %s: %s", msg.subject, behind)
            reply = replies.not_caught_up(self._barrier.wait_seconds)
        except Exception:
            log.exception("query on %s failed", msg.subject)
            reply = replies.internal_error()
        await msg.respond(replies.encode_reply(reply, self._nc.max_payload))

    async def answer(self, query: Query) -> Reply:
        select = self._clickhouse.select
        match query:
            case SearchEvents():
                return await self._search_events(query)
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

    async def _search_events(self, query: SearchEvents) -> Reply:
        rows = await self._clickhouse.select(sql.search_events(query))
        if not rows and not await self._owns(query.user_id, query.conversation_id):
            return replies.conversation_not_found(query.conversation_id)
        events = [(row[0], row[1]) for row in rows]
        return replies.event_page(query, events, self._nc.max_payload)

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
        return replies.conversation_page(query, found, self._nc.max_payload)

    async def _owns(self, user_id: str, conversation_id: str) -> bool:
        return bool(await self._clickhouse.select(sql.get_conversation(user_id, conversation_id)))
