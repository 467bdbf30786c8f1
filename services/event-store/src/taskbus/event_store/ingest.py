"""Ingest of the whole event log into ClickHouse and the status projection.

At-least-once by construction: a batch is inserted, projected, written to KV and only then
acked. A crash before the insert redelivers the batch; a crash after it re-inserts rows that the
ReplacingMergeTree collapses (see `sql`), and the fold skips events it has already applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from taskbus.contracts import subjects
from taskbus.contracts.inbound import DeadLetters, Refused, inbound_event
from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.summary import summarize
from taskbus.event_store import sql
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.progress import IngestProgress
from taskbus.event_store.projection import in_log_order
from taskbus.event_store.purge import Purger
from taskbus.event_store.rows import EventRow, event_row
from taskbus.event_store.status_kv import ConversationStatusKV

log = logging.getLogger(__name__)

# How long one fetch waits for the first message of a batch; bounds how long stop() waits.
_IDLE_FETCH_SECONDS = 1.0
# Unacked messages are redelivered after this; a batch insert takes far less.
_ACK_WAIT_SECONDS = 10.0
_RETRY_DELAY_SECONDS = 1.0
# An event that arrives after a gap in its conversation is handed back (nak) to come again once
# the missing ones have been redelivered; after this many deliveries it is taken as it is (the
# missing events are then gone from the log, e.g. removed by the stream's limits).
_REDELIVERY_DELAY_SECONDS = 1.0
_MAX_DEFERRALS = 30


class Ingester:
    """Projects the log from the named durable consumer on. Without `status_kv` it leaves the
    KV bucket alone: a rebuild writes it once, from `conversations`, when the replay is done."""

    def __init__(
        self,
        js: JetStreamContext,
        clickhouse: ClickHouse,
        status_kv: ConversationStatusKV | None,
        *,
        consumer_name: str,
        batch_size: int,
        flush_interval: float,
        delay: float = 0.0,
        purger: Purger | None = None,
    ) -> None:
        """`delay` (seconds before each batch) is a test hook that makes the ingest slow."""
        self._js = js
        self._dead_letters = DeadLetters(js, subjects.EVENT_STORE)
        self._clickhouse = clickhouse
        self._status_kv = status_kv
        self._purger = purger
        self._consumer_name = consumer_name
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._delay = delay
        self.progress = IngestProgress()
        self._conversations: dict[str, ConversationInfo] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def conversations(self) -> Mapping[str, ConversationInfo]:
        """The status projection of every conversation ingested so far."""
        return self._conversations

    @property
    def consumer_name(self) -> str:
        return self._consumer_name

    async def caught_up(self) -> bool:
        """Whether every event now in the log has been stored and acked."""
        info = await self._js.consumer_info(subjects.EVENTS_STREAM, self._consumer_name)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    async def start(self) -> None:
        loaded = await self._clickhouse.conversations(sql.ALL_CONVERSATIONS)
        self._conversations = {info.conversation_id: info for info in loaded}
        subscription = await self._js.pull_subscribe(
            subjects.ALL_EVENTS,
            durable=self._consumer_name,
            stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=_ACK_WAIT_SECONDS,
                max_ack_pending=self._batch_size * 4,
            ),
        )
        self._task = asyncio.create_task(self._run(subscription), name="event-store-ingest")
        self._purge_deleted(self._conversations.values())  # those a stop left unpurged
        log.info(
            "ingesting %s as %s (%d conversations known)",
            subjects.EVENTS_STREAM,
            self._consumer_name,
            len(self._conversations),
        )

    async def stop(self) -> None:
        """Finish the batch in hand, then stop; unfetched messages stay for the next start."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self._stopping.is_set():
            try:
                batch = await self._next_batch(subscription)
            except Exception:
                log.exception("fetching from %s failed; retrying", subjects.EVENTS_STREAM)
                await asyncio.sleep(_RETRY_DELAY_SECONDS)
                continue
            if batch and self._delay:
                await asyncio.sleep(self._delay)
            while batch and not self._stopping.is_set():
                try:
                    await self.ingest(batch)
                    break
                except Exception:
                    log.exception("ingest of %d events failed; retrying", len(batch))
                    for msg in batch:
                        await msg.in_progress()  # keep them ours while we retry
                    await asyncio.sleep(_RETRY_DELAY_SECONDS)
        await subscription.unsubscribe()

    async def _next_batch(self, subscription: JetStreamContext.PullSubscription) -> list[Msg]:
        """Up to `batch_size` messages: whatever arrives within `flush_interval` of the first."""
        try:
            batch = await subscription.fetch(self._batch_size, timeout=_IDLE_FETCH_SECONDS)
        except TimeoutError:  # nats-py raises its own subclass or asyncio's, depending on path
            return []
        deadline = time.monotonic() + self._flush_interval
        while len(batch) < self._batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch += await subscription.fetch(self._batch_size - len(batch), timeout=remaining)
            except TimeoutError:
                break
        return batch

    async def ingest(self, batch: list[Msg]) -> None:
        """Store, project and ack one batch; the in-memory state moves only once all is written."""
        ingested_at = datetime.now(UTC)
        rows: list[EventRow] = []
        changed: dict[str, ConversationInfo] = {}
        stored: list[Msg] = []
        deferred: list[Msg] = []
        poison: list[Msg] = []
        refused: list[tuple[Msg, Refused]] = []
        deleted: dict[str, ConversationInfo] = {}
        for msg in batch:
            try:
                event = inbound_event(msg.subject, msg.data)
                cid = event.conversation_id
                before = changed.get(cid) or self._conversations.get(cid)
                if not in_log_order(before, event):
                    if msg.metadata.num_delivered < _MAX_DEFERRALS:
                        deferred.append(msg)
                        continue
                    log.warning("event %d of %s: earlier events never came", event.id, cid)
                after = summarize(before, event)
                user_id = after.user_id if after is not None else ""
                row = event_row(msg.data, event, user_id, msg.metadata.timestamp, ingested_at)
            except Refused as refusal:
                refused.append((msg, refusal))
                continue
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                log.error("dropping undecodable message on %s: %s", msg.subject, error)
                poison.append(msg)
                continue
            if after is not None and after is not before:
                changed[cid] = after
            if after is not None and after.status is ConversationStatus.ARCHIVED:
                deleted[cid] = after  # to purge (again, if a straggler came after the purge)
            rows.append(row)
            stored.append(msg)
        await self._clickhouse.insert_events(rows)
        await self._clickhouse.upsert_conversations(list(changed.values()))
        if self._status_kv is not None:
            await self._status_kv.publish_all(changed.values())
        self._conversations.update(changed)
        for msg in poison:
            await msg.term()
        for msg, reason in refused:
            await self._dead_letters.refuse(msg, reason)
        for msg in deferred:
            await msg.nak(delay=_REDELIVERY_DELAY_SECONDS)
        for msg in stored:
            await msg.ack()
        self._purge_deleted(deleted.values())
        self.progress.advance(max((msg.metadata.sequence.stream for msg in batch), default=0))

    def _purge_deleted(self, conversations: Iterable[ConversationInfo]) -> None:
        """Purge the deleted ones among `conversations` (see `purge`; a rebuild leaves it to the
        service's next start)."""
        if self._purger is not None:
            for info in conversations:
                if info.status is ConversationStatus.ARCHIVED:
                    self._purger.schedule(info)
