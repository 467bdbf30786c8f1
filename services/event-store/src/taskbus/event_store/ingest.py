"""Ingest of the whole event log into ClickHouse and the status projection.

At-least-once by construction: a batch is inserted, projected, written to KV and only then
acked. A crash before the insert redelivers the batch; a crash after it re-inserts rows that the
ReplacingMergeTree collapses (see `sql`), and the fold skips events it has already applied.

The log comes through a FastStream durable batch pull consumer (`contracts.broker.durable_pull`)
whose handler settles every message itself: stored ones are acked, ones that came before their
conversation's earlier events are nak'd with a delay, undecodable ones termed, refused ones sent
to the dead letters. A batch whose insert fails is retried here, kept ours by `in_progress`,
never acked before it is stored. FastStream collects a batch until it is full or `flush_interval`
has passed since the fetch began, so an event waits at most that long before its batch is
stored, and an idle consumer sends one pull request per flush interval (10 a second at the
default 100 ms: a few hundred bytes each, against a read-your-writes wait no longer than that).
The consumer has no max_deliver: an event the server gave up redelivering would be missing from
the store for good, and a deferred one relies on up to _MAX_DEFERRALS redeliveries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import msgspec
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from taskbus.contracts import subjects
from taskbus.contracts.broker import BatchMessage, ServiceBroker, durable_pull, jetstream
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
        broker: ServiceBroker,
        clickhouse: ClickHouse,
        status_kv: ConversationStatusKV | None,
        *,
        consumer_name: str,
        batch_size: int,
        flush_interval: float,
        delay: float = 0.0,
        purger: Purger | None = None,
    ) -> None:
        """`broker` is connected; its consumer is declared here and consumes from `start`.
        `delay` (seconds before each batch) is a test hook that makes the ingest slow."""
        self._js = jetstream(broker)
        self._dead_letters = DeadLetters(self._js, subjects.EVENT_STORE)
        self._clickhouse = clickhouse
        self._status_kv = status_kv
        self._purger = purger
        self._consumer_name = consumer_name
        self._delay = delay
        self.progress = IngestProgress()
        self._conversations: dict[str, ConversationInfo] = {}
        self._consumer = durable_pull(
            broker,
            subjects.ALL_EVENTS,
            self._on_batch,
            stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(
                durable_name=consumer_name,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=_ACK_WAIT_SECONDS,
                max_ack_pending=batch_size * 4,
            ),
            batch_size=batch_size,
            timeout=flush_interval,
        )

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
        """Load the projection, then consume: the fold goes on from what is stored."""
        loaded = await self._clickhouse.conversations(sql.ALL_CONVERSATIONS)
        self._conversations = {info.conversation_id: info for info in loaded}
        await self._consumer.start()
        self._purge_deleted(self._conversations.values())  # those a stop left unpurged
        log.info(
            "ingesting %s as %s (%d conversations known)",
            subjects.EVENTS_STREAM,
            self._consumer_name,
            len(self._conversations),
        )

    async def stop(self) -> None:
        """Finish the batch in hand (FastStream waits for it, up to GRACEFUL_STOP_SECONDS; one
        whose insert keeps failing is left unacked, to be redelivered), then stop; unfetched
        messages stay for the next start."""
        await self._consumer.stop()

    async def _on_batch(self, message: BatchMessage) -> None:
        """One batch, in log order; retried until stored, or until the consumer stops."""
        batch: list[Msg] = message.raw_message
        if self._delay:
            await asyncio.sleep(self._delay)
        while True:
            try:
                await self.ingest(batch)
                return
            except Exception:
                if not self._consumer.running:
                    log.exception("ingest of %d events failed; left for the next start", len(batch))
                    return  # unacked: delivered again after ack_wait
                log.exception("ingest of %d events failed; retrying", len(batch))
            for msg in _unsettled(batch):
                await msg.in_progress()  # keep them ours while we retry
            await asyncio.sleep(_RETRY_DELAY_SECONDS)

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
        # Settle each message once: a retried batch may have settled some before it failed.
        for msg in _unsettled(poison):
            await msg.term()
        for msg, reason in refused:
            if not msg.is_acked:
                await self._dead_letters.refuse(msg, reason)
        for msg in _unsettled(deferred):
            await msg.nak(delay=_REDELIVERY_DELAY_SECONDS)
        for msg in _unsettled(stored):
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


def _unsettled(messages: list[Msg]) -> list[Msg]:
    return [msg for msg in messages if not msg.is_acked]
