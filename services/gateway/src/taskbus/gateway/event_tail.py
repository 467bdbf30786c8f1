"""Replay of one conversation's events after a given id, then the live log: gap-free,
duplicate-free, in id order, with a bounded buffer per reader, across nats-server restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.streams import last_message
from taskbus.contracts.tasks import cancel_and_wait
from taskbus.gateway.reconnects import Reconnects

logger = logging.getLogger(__name__)


class _EventId(msgspec.Struct):
    id: int


_id_decoder = msgspec.json.Decoder(_EventId)

# How long a live event may wait for room in a full buffer before the reader counts as slow.
# Not zero: nats-py hands a subscription everything it read in one go without yielding, so a
# burst fills the buffer of a reader that keeps up before its sender even runs; the wait lets
# it drain. While the callback waits, JetStream's flow control holds the consumer back, so the
# wait costs no memory beyond the buffer and the messages already in flight.
SLOW_READER_SECONDS = 3.0
# Pauses between attempts to re-create the consumer while JetStream does not answer.
_RESUBSCRIBE_FIRST_PAUSE_SECONDS = 0.25
_RESUBSCRIBE_MAX_PAUSE_SECONDS = 5.0


class SlowConsumer(Exception):
    """The reader fell more than the buffer's size behind the live log."""


class EventTail:
    """An ordered JetStream consumer on `taskbus.events.<cid>.>` that starts at the first event
    after `after_id` (found by binary search over the stream, not by scanning from the start).

    History (events already in the log when the tail opens) waits for the reader, so a long
    replay never counts as slowness; a live event that finds the buffer full for
    SLOW_READER_SECONDS marks the reader slow, and `overflowed` is set for the owner to
    disconnect it.

    A restarted nats-server has forgotten the (in-memory, ephemeral) consumer, and nats-py's
    ordered consumer would only notice after two missed idle heartbeats (10-20 s). So on every
    reconnect the tail replaces its consumer by one starting after the last event it took.
    """

    def __init__(
        self,
        js: JetStreamContext,
        reconnects: Reconnects,
        conversation_id: str,
        after_id: int,
        max_buffered: int,
    ) -> None:
        self._js = js
        self._reconnects = reconnects
        self._cid = conversation_id
        self._filter = subjects.conversation_events(conversation_id)
        self._last_id = after_id
        # Stream sequence after the last message taken (buffered or skipped): where to resume.
        self._next_seq = 1
        self._buffer: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(maxsize=max_buffered)
        self._history_until_seq = 0
        self._subscription: Subscription | None = None
        self._resuming: asyncio.Task[None] | None = None
        self.overflowed = asyncio.Event()

    async def __aenter__(self) -> EventTail:
        reconnects_seen = self._reconnects.count
        self._next_seq = await self._start_sequence()
        self._subscription = await self._subscribe()
        self._resuming = asyncio.create_task(self._resume_after_reconnects(reconnects_seen))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._resuming is not None:
            await cancel_and_wait(self._resuming)
            self._resuming = None
        await self._unsubscribe()

    async def next_event(self, wait_seconds: float) -> tuple[int, bytes] | None:
        """The next (id, stored JSON) in order, or None if nothing came within `wait_seconds`."""
        if self.overflowed.is_set():
            raise SlowConsumer(self._cid)
        try:
            return await asyncio.wait_for(self._buffer.get(), wait_seconds)
        except TimeoutError:
            return None

    async def _subscribe(self) -> Subscription:
        return await self._js.subscribe(
            self._filter,
            stream=subjects.EVENTS_STREAM,
            cb=self._on_message,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._next_seq
            ),
        )

    async def _unsubscribe(self) -> None:
        """Stops delivery: a callback waiting to buffer is cancelled before it takes its event."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(nats.errors.Error):  # a closed connection has no interest
                await subscription.unsubscribe()

    async def _resume_after_reconnects(self, seen: int) -> None:
        while True:
            seen = await self._reconnects.after(seen)
            await self._unsubscribe()
            pause = _RESUBSCRIBE_FIRST_PAUSE_SECONDS
            while self._subscription is None:
                try:
                    self._subscription = await self._subscribe()
                except (nats.errors.Error, TimeoutError) as error:
                    logger.warning("re-creating the tail of %s failed: %r", self._cid, error)
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, _RESUBSCRIBE_MAX_PAUSE_SECONDS)
            logger.info("tail of %s resumed at stream sequence %d", self._cid, self._next_seq)

    async def _on_message(self, msg: Msg) -> None:
        if self.overflowed.is_set():
            return
        seq = msg.metadata.sequence.stream
        try:
            event_id = _id_decoder.decode(msg.data).id
        except msgspec.DecodeError:
            logger.warning("skipping an undecodable event on %s", msg.subject)
            self._next_seq = seq + 1
            return
        if event_id > self._last_id:  # else before the requested start, or already delivered
            if event_id != self._last_id + 1:
                logger.error(
                    "event ids of %s jump from %d to %d", self._cid, self._last_id, event_id
                )
            if seq <= self._history_until_seq:
                await self._buffer.put((event_id, msg.data))
            else:
                try:
                    async with asyncio.timeout(SLOW_READER_SECONDS):
                        await self._buffer.put((event_id, msg.data))
                except TimeoutError:
                    self.overflowed.set()
                    return
            # Only now, after the (cancellable) wait to buffer, is the event taken.
            self._last_id = event_id
        self._next_seq = seq + 1

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
        if seq is None:
            message = await last_message(self._js, self._filter)
        else:
            try:
                message = await self._js.get_msg(
                    subjects.EVENTS_STREAM, seq, subject=self._filter, next=True, direct=True
                )
            except NotFoundError:
                return None
        if message is None:
            return None
        assert message.seq is not None and message.data is not None
        return message.seq, _id_decoder.decode(message.data).id
