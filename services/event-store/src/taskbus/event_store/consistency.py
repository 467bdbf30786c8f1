"""Read-your-writes for every query: a query is answered only once the ingest has stored the log
as it stood when the query arrived.

The event store may lag the log (a batch, a slow ClickHouse, a restart); a read must not. So
when a query arrives, the responder reads where the log is:
- a query about one conversation: its last event (direct get of the last message on
  `taskbus.events.<p>.<cid>.>`); the query waits until its partition's durable has acked that
  event, or this process's fold of the conversation has stored it (ids are dense and folded in
  order, so "the fold is at id N" means "events 0..N are in ClickHouse");
- a query across conversations (lists, analytics): every partition's durable with anything
  unacked is asked to have acked its partition's last message (read once, after the query
  came, so never too early).
Anything a client has seen (a create response, a GET, a WebSocket frame, an analytics row) was
in the log before its next request reached the event store, so it lies within that position.

Why wait in the event store rather than let the gateway read the missing tail from the log: the
answer then comes from one source, so every filter (kind, source, text, time window), the
cursors and `has_more` stay as honest as they are for a caught-up store, and every asker (the
gateway, the CLI, tests) gets the rule, written once. The wait is bounded (`read_wait_ms`,
below the gateway's request timeout); past it the query answers 503 with Retry-After, never a
page that silently lacks events.

The positions are the ingest durables' own, on the server: each partition has one durable,
acked only once a batch is stored, so whichever instance holds the partition, "its durable has
acked the event" means "the event is in ClickHouse" (`progress.has_acked`). Any instance can
answer any query by that rule; with a ClickHouse server they all read the one store, while with
chDB each reads its own, which holds only what that instance ingested (so several chDB
instances answer right only for what each holds: run one, the default). A query about one
conversation waits on its partition's durable only; one this instance folds is answered as soon
as its fold has reached the conversation's last event, without asking the server.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.partitions import PARTITIONS, partition_of
from taskbus.contracts.queries import (
    EventKindCounts,
    GetConversation,
    GetEvent,
    Query,
    SearchEvents,
)
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.streams import last_message
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.progress import has_acked

log = logging.getLogger(__name__)

# While this process's ingest makes no progress, how often to ask the server again (another
# instance may hold the partition; an ack reaches the durable's state a moment after it is sent).
_POLL_SECONDS = 0.05


class _EventId(msgspec.Struct):
    id: int


_id_decoder = msgspec.json.Decoder(_EventId)


class NotCaughtUp(Exception):
    """The ingest did not reach the query's position within the bound."""


class ReadBarrier:
    """Holds a query until the ingest has stored the log up to the query's arrival."""

    def __init__(self, js: JetStreamContext, ingester: Ingester, wait_seconds: float) -> None:
        self._js = js
        self._ingester = ingester
        self.wait_seconds = wait_seconds

    async def wait_for(self, query: Query) -> int | None:
        """Returns once the ingest covers the log as of now; raises NotCaughtUp past the bound.
        For a query about one conversation, returns the id of its last event in the log as the
        query came, which the store now holds (None: it has none, or it is undecodable)."""
        try:
            return await self._wait_for(query)
        except (nats.errors.Error, TimeoutError) as error:
            raise NotCaughtUp(f"the log did not say where it is: {error!r}") from error

    async def _wait_for(self, query: Query) -> int | None:
        deadline = time.monotonic() + self.wait_seconds
        conversation_id = _conversation_of(query)
        if conversation_id is None:
            waiting = list(range(PARTITIONS))
            last_id = -1
        else:
            if not subjects.is_valid_conversation_id(conversation_id):
                return None  # no subject can name it, so the log holds nothing of it
            waiting = [partition_of(conversation_id)]
            found = await self._conversation_end(conversation_id)
            if found is None:
                return None
            target, last_id = found
        targets: dict[int, int] = {}  # partition -> the stream sequence to wait for
        if conversation_id is not None:
            targets[partition_of(conversation_id)] = target
        while True:
            if conversation_id is not None and self._folded(conversation_id, last_id):
                return last_id
            acked = await asyncio.gather(*(self._acked(p, targets) for p in waiting))
            waiting = [p for p, done in zip(waiting, acked, strict=True) if not done]
            if not waiting:
                return last_id if last_id >= 0 else None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotCaughtUp(f"the event store is behind the log in partitions {waiting}")
            await self._ingester.progress.moved(min(remaining, _POLL_SECONDS))

    def _folded(self, conversation_id: str, last_id: int) -> bool:
        """Whether this process's fold (hence its store) holds the conversation up to
        `last_id` (ids are dense and folded in order). A deleted conversation is folded no
        further: its durable then tells."""
        info = self._ingester.conversations.get(conversation_id)
        deleted = info is not None and info.status is ConversationStatus.ARCHIVED
        return info is not None and last_id >= 0 and not deleted and info.last_event_id >= last_id

    async def _acked(self, partition: int, targets: dict[int, int]) -> bool:
        """Whether the partition's durable has acked its target; a partition without one yet
        gets its last message as of now (later than the query's arrival, so never too early)."""
        durable = self._ingester.durable(partition)
        if partition not in targets:
            last = await last_message(self._js, subjects.partition_events(partition))
            if last is None:
                return True  # nothing of it in the log
            assert last.seq is not None
            targets[partition] = last.seq
        try:
            return await has_acked(self._js, durable, targets[partition])
        except nats.js.errors.NotFoundError:
            return False  # no instance has consumed the partition yet

    async def _conversation_end(self, conversation_id: str) -> tuple[int, int] | None:
        """(stream sequence, event id) of the conversation's last event, None if it has none."""
        message = await last_message(self._js, subjects.conversation_events(conversation_id))
        if message is None:
            return None
        assert message.seq is not None and message.data is not None
        try:
            return message.seq, _id_decoder.decode(message.data).id
        except msgspec.DecodeError:
            return message.seq, -1  # undecodable: the ingest drops it; wait until it is handled


def _conversation_of(query: Query) -> str | None:
    match query:
        case SearchEvents() | GetEvent() | GetConversation():
            return query.conversation_id
        case EventKindCounts():
            return query.conversation_id
    return None
