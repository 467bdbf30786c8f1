"""Replay of one conversation's events after a given id, then the live log: gap-free,
duplicate-free, in id order, with a bounded buffer per reader."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from taskbus.contracts import subjects

logger = logging.getLogger(__name__)


class _EventId(msgspec.Struct):
    id: int


_id_decoder = msgspec.json.Decoder(_EventId)


class SlowConsumer(Exception):
    """The reader fell more than the buffer's size behind the live log."""


class EventTail:
    """An ordered JetStream consumer on `taskbus.events.<cid>.>` that starts at the first event
    after `after_id` (found by binary search over the stream, not by scanning from the start).

    History (events already in the log when the tail opens) waits for the reader, so a long
    replay never counts as slowness; live events that find the buffer full mark the reader
    slow, and `overflowed` is set for the owner to disconnect it.
    """

    def __init__(
        self, js: JetStreamContext, conversation_id: str, after_id: int, max_buffered: int
    ) -> None:
        self._js = js
        self._cid = conversation_id
        self._filter = subjects.conversation_events(conversation_id)
        self._last_id = after_id
        self._buffer: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(maxsize=max_buffered)
        self._history_until_seq = 0
        self._subscription: Subscription | None = None
        self.overflowed = asyncio.Event()

    async def __aenter__(self) -> EventTail:
        start_seq = await self._start_sequence()
        self._subscription = await self._js.subscribe(
            self._filter,
            stream=subjects.EVENTS_STREAM,
            cb=self._on_message,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq
            ),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    async def next_event(self, wait_seconds: float) -> tuple[int, bytes] | None:
        """The next (id, stored JSON) in order, or None if nothing came within `wait_seconds`."""
        if self.overflowed.is_set():
            raise SlowConsumer(self._cid)
        try:
            return await asyncio.wait_for(self._buffer.get(), wait_seconds)
        except TimeoutError:
            return None

    async def _on_message(self, msg: Msg) -> None:
        if self.overflowed.is_set():
            return
        try:
            event_id = _id_decoder.decode(msg.data).id
        except msgspec.DecodeError:
            logger.warning("skipping an undecodable event on %s", msg.subject)
            return
        if event_id <= self._last_id:
            return  # before the requested start, or already delivered
        if event_id != self._last_id + 1:
            logger.error("event ids of %s jump from %d to %d", self._cid, self._last_id, event_id)
        self._last_id = event_id
        if msg.metadata.sequence.stream <= self._history_until_seq:
            await self._buffer.put((event_id, msg.data))
            return
        try:
            self._buffer.put_nowait((event_id, msg.data))
        except asyncio.QueueFull:
            self.overflowed.set()

    async def _start_sequence(self) -> int:
        """The stream sequence to start at: at or before the first event with id > after_id."""
        tail = await self._next_at_or_after(None)
        if tail is None:
            return 1
        tail_seq, tail_id = tail
        self._history_until_seq = tail_seq
        if tail_id <= self._last_id:
            return tail_seq + 1
        first = await self._next_at_or_after(1)
        assert first is not None  # the tail exists, so a first event does
        low_seq, first_id = first
        if first_id > self._last_id:
            return low_seq
        # Invariant: the first event at or after low_seq has id <= after_id, at high_seq > after_id.
        high_seq = tail_seq
        while high_seq - low_seq > 1:
            middle = (low_seq + high_seq) // 2
            found = await self._next_at_or_after(middle)
            assert found is not None  # the tail lies at or after any middle
            seq, event_id = found
            if event_id > self._last_id:
                high_seq = middle
            else:
                low_seq = seq
        return high_seq

    async def _next_at_or_after(self, seq: int | None) -> tuple[int, int] | None:
        """(stream sequence, event id) of this conversation's first event at or after `seq`,
        or of its last event when `seq` is None."""
        try:
            if seq is None:
                message = await self._js.get_last_msg(
                    subjects.EVENTS_STREAM, self._filter, direct=True
                )
            else:
                message = await self._js.get_msg(
                    subjects.EVENTS_STREAM, seq, subject=self._filter, next=True, direct=True
                )
        except NotFoundError:
            return None
        assert message.seq is not None and message.data is not None
        return message.seq, _id_decoder.decode(message.data).id
