"""Read-your-writes for every query: a query is answered only once the ingest has stored the log
as it stood when the query arrived.

The event store may lag the log (a batch, a slow ClickHouse, a restart); a read must not. So
when a query arrives, the responder reads where the log is, by one JetStream round trip:
- a query about one conversation: its last event (direct get of the last message on
  `taskbus.events.<cid>.>`); the query waits until the ingest's fold of that conversation
  has stored every event up to that one (ids are dense and folded in order, so "the fold is
  at id N" means "events 0..N are in ClickHouse");
- a query across conversations (lists, analytics): the stream's last sequence; the query waits
  until the ingest has handled every message up to it.
Anything a client has seen (a create response, a GET, a WebSocket frame, an analytics row) was
in the log before its next request reached the event store, so it lies within that position.

Why wait in the event store rather than let the gateway read the missing tail from the log: the
answer then comes from one source, so every filter (kind, source, text, time window), the
cursors and `has_more` stay as honest as they are for a caught-up store, and every asker (the
gateway, the CLI, tests) gets the rule, written once. The wait is bounded (`read_wait_ms`,
below the gateway's request timeout); past it the query answers 503 with Retry-After, never a
page that silently lacks events.

The positions are the ingest's own, in this process: the event-store runs as one instance
(deploy/README.md) whose ingest and responder share it. Progress of a conversation is
per-conversation, so a conversation held back after a crash (its events redelivered out of
order) delays only reads that need it.
"""

from __future__ import annotations

import logging
import time

import msgspec
import nats.errors
from nats.js import JetStreamContext

from taskbus.contracts import subjects
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

log = logging.getLogger(__name__)

# While waiting without progress, how often to check whether the ingest has drained the log
# (it may never receive the awaited message if it was removed from the stream meanwhile).
_DRAINED_CHECK_SECONDS = 0.5


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

    async def wait_for(self, query: Query) -> None:
        """Returns once the ingest covers the log as of now; raises NotCaughtUp past the bound."""
        try:
            await self._wait_for(query)
        except (nats.errors.Error, TimeoutError) as error:
            raise NotCaughtUp(f"the log did not say where it is: {error!r}") from error

    async def _wait_for(self, query: Query) -> None:
        deadline = time.monotonic() + self.wait_seconds
        conversation_id = _conversation_of(query)
        if conversation_id is None:
            target = await self._stream_end()

            def ready() -> bool:
                return self._ingester.progress.handled_through >= target

        else:
            if not subjects.is_valid_conversation_id(conversation_id):
                return  # no subject can name it, so the log holds nothing of it
            found = await self._conversation_end(conversation_id)
            if found is None:
                return
            target, last_id = found

            def ready() -> bool:
                info = self._ingester.conversations.get(conversation_id)
                deleted = info is not None and info.status is ConversationStatus.ARCHIVED
                if info is not None and last_id >= 0 and not deleted:
                    return info.last_event_id >= last_id
                # Nothing folded (e.g. only a refusal so far) or deleted (the ingest folds
                # nothing more of it): that the message was handled is all to wait for.
                return self._ingester.progress.handled_through >= target

        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotCaughtUp(f"the event store is behind the log at sequence {target}")
            moved = await self._ingester.progress.moved(min(remaining, _DRAINED_CHECK_SECONDS))
            if not moved and await self._drained():
                return

    async def _stream_end(self) -> int:
        info = await self._js.stream_info(subjects.EVENTS_STREAM)
        return int(info.state.last_seq)

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

    async def _drained(self) -> bool:
        """Whether the ingest has handled every message its consumer can still deliver."""
        try:
            info = await self._js.consumer_info(
                subjects.EVENTS_STREAM, self._ingester.consumer_name
            )
        except (nats.errors.Error, TimeoutError) as error:
            log.warning("reading the ingest consumer failed: %r", error)
            return False
        delivered = info.delivered.stream_seq or 0
        return bool(
            info.num_pending == 0
            and info.num_ack_pending == 0
            and self._ingester.progress.handled_through >= delivered
        )


def _conversation_of(query: Query) -> str | None:
    match query:
        case SearchEvents() | GetEvent() | GetConversation():
            return query.conversation_id
        case EventKindCounts():
            return query.conversation_id
    return None
