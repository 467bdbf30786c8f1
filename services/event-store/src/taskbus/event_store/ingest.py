"""Ingest of the event log into ClickHouse and the status projection, one durable per partition.

At-least-once by construction: a batch is inserted, projected, written to KV and only then
acked. A crash before the insert redelivers the batch; a crash after it re-inserts rows that the
ReplacingMergeTree collapses (see `sql`), and the fold skips events it has already applied.

Several instances share the work by partition (contracts.partitions leases, group = the
consumer name): each partition has one durable, `subjects.event_store_durable`, consumed by
whichever instance holds its lease, so a new holder resumes where the last one acked. Dedupe
stays exact across a hand-over to one ClickHouse server: a row's key (user, conversation, id)
and content come from the log alone, so a batch the old holder stored but never acked and the
new holder stores again collapses to one row, and the new holder's fold starts from the
`conversations` rows the old one wrote before acking (`acquired`). A conversation lives in one
partition, so two instances never fold the same one. With chDB each instance has its own
store: it holds, and can answer for, only what it ingested itself (run one, the default).

Each durable comes through a FastStream batch pull consumer (`contracts.broker.durable_pull`)
whose handler settles every message itself: stored ones are acked, ones that came before their
conversation's earlier events are nak'd with a delay, undecodable ones termed, refused ones sent
to the dead letters. A batch whose insert fails is retried here, kept ours by `in_progress`
(renewed while the batch is in hand, `broker.renew_while_held`), never acked before it is stored.
A batch is what a partition's standing pull request has brought when the handler is free
(`durable_pull`): an idle partition renews its request once per
`_IDLE_POLL_SECONDS`, where FastStream's own loop sent two per flush interval (320 a second for
an idle event-store). The
batches are gathered by the writes instead: they go one at a time (`_writing`), each taking
every batch waiting. They start at least a flush interval apart, up to a second under load
(`write_spacing`), unless a query is waiting for them: an event then waits at most about a flush
interval plus a second before it is stored, and a query no longer than it did. The consumers
have no max_deliver: an event the server gave up redelivering would be missing from the store
for good, and a deferred one relies on up to _MAX_DEFERRALS redeliveries.

Memory is bounded: the fold holds the most recently ingested conversations (`cache_size`) and
looks the others up in ClickHouse when their events come (conversation_cache).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import msgspec
from faststream.nats.subscriber.usecases import BatchPullStreamSubscriber
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from taskbus.contracts import subjects
from taskbus.contracts.broker import (
    BatchMessage,
    ServiceBroker,
    durable_pull,
    jetstream,
    renew_while_held,
)
from taskbus.contracts.inbound import DeadLetters, Refused, inbound_event
from taskbus.contracts.observability import conversation
from taskbus.contracts.partitions import PARTITIONS, partition_of
from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.summary import summarize
from taskbus.event_store import sql
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.conversation_cache import ConversationCache
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
# Under load, at most this share of the time goes to writing (`write_spacing`), and writes are
# never spaced further apart than this.
WRITE_SHARE = 1 / 8
_LONGEST_WRITE_SPACING_SECONDS = 1.0
# How long a partition's pull request stands before it is renewed (messages come as they are
# stored). One left on the server by a consumer that stopped (its partition lost) catches
# nothing: the server skips a request whose inbox no one reads.
_IDLE_POLL_SECONDS = 1.0


def write_spacing(took: float, flush_interval: float, share: float = WRITE_SHARE) -> float:
    """Seconds from the start of a write that took `took` to the start of the next one.

    A ClickHouse insert costs about the same for 1 row as for 1,000 (a new part on disk), so
    the cost of the ingest is its number of writes, not of events. A write that took longer (a
    loaded host, more rows, a busy server) is followed by a longer pause, in which more events
    gather for the next one: the ingest then spends at most `share` of its time writing
    instead of its whole core. Under a light load writes stay a flush interval apart."""
    return max(flush_interval, min(took / share, _LONGEST_WRITE_SPACING_SECONDS))


class Ingester:
    """Projects the log from the durables of the partitions it is given (`acquired`, `lost`:
    `PartitionLeases`' callbacks; `start` takes them all, as a single instance does). Without
    `status_kv` it leaves the KV bucket alone: a rebuild writes it once, from `conversations`,
    when the replay is done."""

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
        cache_size: int = 10_000,
        write_share: float = WRITE_SHARE,
    ) -> None:
        """`broker` is connected; a partition's durable is created (or updated) and consumed
        once the partition is acquired. `consumer_name` names the durables (see
        `subjects.event_store_durable`). `delay` (seconds before each batch) is a test hook
        that makes the ingest slow. `cache_size` bounds the conversations held in memory
        (`ConversationCache`). `write_share` bounds the time spent writing under load
        (`write_spacing`)."""
        self._broker = broker
        self._js = jetstream(broker)
        self._dead_letters = DeadLetters(self._js, subjects.EVENT_STORE)
        self._clickhouse = clickhouse
        self._status_kv = status_kv
        self._purger = purger
        self._consumer_name = consumer_name
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._write_share = write_share
        self._delay = delay
        self.progress = IngestProgress()
        self._cache_size = cache_size
        self._conversations = ConversationCache(clickhouse, cache_size)
        # Declared on a partition's first acquisition, started and stopped with its lease.
        self._consumers: dict[int, BatchPullStreamSubscriber] = {}
        self._held: frozenset[int] = frozenset()
        # One write at a time: the writer is one ClickHouse connection, and the KV writes of a
        # write must not overtake those of the write before. Batches of other partitions handed
        # in meanwhile wait in `_pending` and go in the next write together (`_write`).
        self._writing = asyncio.Lock()
        self._pending: list[tuple[list[Msg], asyncio.Future[None]]] = []
        self._next_write_at = 0.0  # monotonic: when the next write may start (`_write`)

    @property
    def conversations(self) -> Mapping[str, ConversationInfo]:
        """The status projection of the held partitions' most recently ingested conversations
        (at most `cache_size`; the others are in ClickHouse)."""
        return self._conversations

    @property
    def consumer_name(self) -> str:
        return self._consumer_name

    @property
    def held(self) -> frozenset[int]:
        """The partitions consumed: from their acquisition until their loss."""
        return self._held

    def durable(self, partition: int) -> str:
        return subjects.event_store_durable(partition, self._consumer_name)

    def _config(self, partition: int) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable(partition),
            filter_subject=subjects.partition_events(partition),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=_ACK_WAIT_SECONDS,
            max_ack_pending=self._batch_size * 4,
        )

    async def caught_up(self) -> bool:
        """Whether every event of the held partitions now in the log is stored and acked."""
        infos = await asyncio.gather(
            *(self._js.consumer_info(subjects.EVENTS_STREAM, self.durable(p)) for p in self._held)
        )
        return all(info.num_pending == 0 and info.num_ack_pending == 0 for info in infos)

    async def start(self) -> None:
        """Ingest every partition (a single instance, a rebuild)."""
        await self.acquired(frozenset(range(PARTITIONS)))

    async def stop(self) -> None:
        """Finish the batches in hand (FastStream waits for them, up to GRACEFUL_STOP_SECONDS;
        one whose insert keeps failing is left unacked, to be redelivered), then stop;
        unfetched messages stay for the next holder."""
        await self.lost(self._held)

    async def acquired(self, partitions: frozenset[int]) -> None:
        """Load the partitions' recent conversations from ClickHouse (the others on a miss),
        then consume them: the fold goes on from what is stored. With a ClickHouse server that
        is what the previous holder stored before it acked; with an instance's own chDB it is
        what this one stored."""
        for partition in sorted(partitions):
            await self._js.add_consumer(subjects.EVENTS_STREAM, self._config(partition))
        recent = await self._clickhouse.conversations(sql.recent_conversations(self._cache_size))
        loaded = [info for info in recent if partition_of(info.conversation_id) in partitions]
        self._conversations.update(reversed(loaded))  # the most recent last: dropped last
        deleted = [
            info
            for info in await self._clickhouse.conversations(sql.DELETED_CONVERSATIONS)
            if partition_of(info.conversation_id) in partitions
        ]
        self._held |= partitions
        for partition in sorted(partitions):
            if partition not in self._consumers:
                self._consumers[partition] = self._declare(partition)
            await self._consumers[partition].start()
        self._purge_deleted(deleted)  # those a stop left unpurged
        log.info(
            "ingesting partitions %s of %s as %s (%d recent conversations loaded)",
            sorted(partitions),
            subjects.EVENTS_STREAM,
            self._consumer_name,
            len(loaded),
        )

    async def lost(self, partitions: frozenset[int]) -> None:
        """Stop consuming the partitions (each finishing its batch in hand) and forget their
        conversations: another instance folds them on."""
        mine = partitions & self._held
        self._held -= mine
        await asyncio.gather(*(self._consumers[p].stop() for p in mine if p in self._consumers))
        self._conversations.discard(
            [cid for cid in self._conversations if partition_of(cid) in mine]
        )

    def _declare(self, partition: int) -> BatchPullStreamSubscriber:
        async def on_batch(message: BatchMessage) -> None:
            await self._on_batch(partition, message)

        on_batch.__name__ = f"{self.durable(partition)}_ingest"  # FastStream's name of it
        return durable_pull(
            self._broker,
            subjects.partition_events(partition),
            on_batch,
            stream=subjects.EVENTS_STREAM,
            config=self._config(partition),
            batch_size=self._batch_size,
            expires=_IDLE_POLL_SECONDS,
        )

    async def _on_batch(self, partition: int, message: BatchMessage) -> None:
        """One batch, in log order; retried until stored, or until the partition is lost."""
        batch: list[Msg] = message.raw_message
        # Renewed from the handler's start, independently of the write: a write slower than the
        # ack wait (a loaded host, a ClickHouse server merging) keeps its batch; most renew
        # nothing.
        renewal = asyncio.create_task(
            renew_while_held(lambda: _unsettled(batch), _ACK_WAIT_SECONDS / 4)
        )
        try:
            if self._delay:
                await asyncio.sleep(self._delay)
            while True:
                try:
                    await self._write(batch)
                    return
                except Exception:
                    if partition not in self._held or not self._consumers[partition].running:
                        log.exception(
                            "ingest of %d events failed; left for the next start", len(batch)
                        )
                        return  # unacked: delivered again after ack_wait
                    log.exception("ingest of %d events failed; retrying", len(batch))
                await asyncio.sleep(_RETRY_DELAY_SECONDS)
        finally:
            renewal.cancel()

    async def _write(self, batch: list[Msg]) -> None:
        """Store `batch`, in one write with whatever other partitions' batches are waiting: 16
        partitions flushing a few events each would otherwise make 16 small inserts in a row.
        Their conversations are disjoint, so joining the batches keeps each one's log order.

        Writes start at least a flush interval apart, further under load (`write_spacing`):
        an insert costs about the same for 1 row as for 1,000 (12-14 ms of CPU on these
        machines' ext4), so back-to-back writes of a few events each kept the ingest busy on a
        whole core under a light steady load; paced, their batches join. A query waiting for
        the ingest (`consistency.ReadBarrier`) ends the pause at once, so reads stay as fresh
        as before. An idle ingest writes at once. Only a stored write delays the next: the
        retries of a failing one are paced by `_on_batch`, and paced here as well, partitions
        retrying out of step would take turns a whole interval apart."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((batch, done))
        async with self._writing:
            if not done.done():  # no write took it while we waited: this one takes them all
                await self.progress.pause(self._next_write_at - time.monotonic())
                started = time.monotonic()
                taken, self._pending = self._pending, []
                try:
                    await self.ingest([msg for waiting, _ in taken for msg in waiting])
                except Exception as error:
                    for _, each in taken:
                        each.set_exception(error)
                else:
                    took = time.monotonic() - started
                    spacing = write_spacing(took, self._flush_interval, self._write_share)
                    self._next_write_at = started + spacing
                    for _, each in taken:
                        each.set_result(None)
        await done  # raises what the write that took `batch` raised

    async def ingest(self, batch: list[Msg]) -> None:
        """Store, project and ack one batch (holding `_writing`); the in-memory state moves
        only once all is written."""
        ingested_at = datetime.now(UTC)
        rows: list[EventRow] = []
        changed: dict[str, ConversationInfo] = {}
        stored: list[Msg] = []
        deferred: list[Msg] = []
        poison: list[Msg] = []
        refused: list[tuple[Msg, Refused]] = []
        deleted: dict[str, ConversationInfo] = {}
        known = await self._conversations.lookup(_conversations_of(batch))
        for msg in batch:
            try:
                event = inbound_event(msg.subject, msg.data)
                cid = event.conversation_id
                before = changed.get(cid) or known.get(cid)
                if not in_log_order(before, event):
                    if msg.metadata.num_delivered < _MAX_DEFERRALS:
                        deferred.append(msg)
                        continue
                    with conversation(cid):
                        log.warning("event %d: earlier events never came", event.id)
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
        self._conversations.update(changed.values())
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
        self.progress.advance()

    def _purge_deleted(self, conversations: Iterable[ConversationInfo]) -> None:
        """Purge the deleted ones among `conversations` (see `purge`; a rebuild leaves it to the
        service's next start)."""
        if self._purger is not None:
            for info in conversations:
                if info.status is ConversationStatus.ARCHIVED:
                    self._purger.schedule(info)


def _conversations_of(batch: list[Msg]) -> set[str]:
    """The conversations of `batch` whose projection so far the fold needs. A conversation
    whose `ConversationCreated` is in the batch is no exception: a fresh consumer (a rebuild, a
    replay) delivers it for the first time although it was stored long ago."""
    conversations = {subjects.conversation_id_of(msg.subject) for msg in batch}
    return {cid for cid in conversations if subjects.is_valid_conversation_id(cid)}


def _unsettled(messages: list[Msg]) -> list[Msg]:
    return [msg for msg in messages if not msg.is_acked]
