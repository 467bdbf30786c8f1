"""`python -m taskbus.event_store rebuild`: drop every ClickHouse table and replay the whole log.

Run it with every event-store instance stopped: it refuses while an instance renews its
membership of the partition leases, while a partition's durable is in use, or while another
process holds the embedded chDB path (`ensure_not_running`). The partitions' durables are
deleted and created afresh under the same names, so the service, once restarted, continues
exactly where the replay ended. The KV status projection is written once at the end,
overwriting each conversation's value with the rebuilt one; events appended during the replay
are part of it, since the replay runs until the durables have nothing pending.

Deleted conversations agree too: a purged one is no longer in the log, so the rebuilt tables
hold nothing of it, and its KV tombstone stays (only replayed conversations are written). One
deleted but not yet purged is replayed as ARCHIVED, hidden like before, and purged by the
service's next start (see `purge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.broker import ServiceBroker, jetstream
from taskbus.contracts.partitions import PARTITIONS, renewing_members
from taskbus.event_store import sql
from taskbus.event_store.clickhouse import ClickHouse, chdb_lock_holder
from taskbus.event_store.ingest import Ingester
from taskbus.event_store.status_kv import ConversationStatusKV

log = logging.getLogger(__name__)

_CATCH_UP_POLL_SECONDS = 0.1
# A running event-store keeps a pull request waiting almost all the time (each lasts the
# ingest's flush interval, see `ingest`), so its consumer is taken as free only once it has
# looked idle this long without a break; one that still looks busy after the grace period
# belongs to a running service (a stopped one's last pull expires within a flush interval).
_IDLE_PROOF_SECONDS = 2.0
_BUSY_GRACE_SECONDS = 5.0


class EventStoreRunning(RuntimeError):
    """The event-store still consumes under the name the rebuild would replace."""


async def ensure_not_running(js: JetStreamContext, consumer_name: str, clickhouse_dsn: str) -> None:
    """Refuse to rebuild under a running event-store, by every sign one gives. Its heartbeat in
    the partition leases comes first: the durables alone miss an instance that has just
    started (no pull waiting yet while it loads its partitions), and the chDB lock is the last
    word on an embedded path, asked before the rebuild opens it."""
    leases = await js.key_value(subjects.PARTITIONS_BUCKET)
    running = await renewing_members(leases, consumer_name)
    if running:
        raise EventStoreRunning(
            f"the event-store is consuming as {', '.join(map(repr, running))} (its partition"
            " leases are renewed): stop every instance before a rebuild"
        )
    await _ensure_not_consuming(js, consumer_name)
    holder = chdb_lock_holder(clickhouse_dsn)
    if holder is not None:
        raise EventStoreRunning(
            f"the event-store is running: its chDB data path is held open ({holder}): stop"
            " it before a rebuild"
        )


async def _ensure_not_consuming(js: JetStreamContext, consumer_name: str) -> None:
    """A partition's durable has no pull requests waiting and no events in hand (with a
    ClickHouse server, the leases and this are all that stop a rebuild)."""
    deadline = time.monotonic() + _BUSY_GRACE_SECONDS
    idle_since: float | None = None
    while True:
        infos = await asyncio.gather(
            *(_consumer_info(js, durable) for durable in _durables(consumer_name))
        )
        busy = [
            info
            for info in infos
            if info is not None and (info.num_waiting or info.num_ack_pending)
        ]
        now = time.monotonic()
        if busy:
            idle_since = None
            if now > deadline:
                info = busy[0]
                raise EventStoreRunning(
                    f"the event-store is consuming as {info.name!r} ({info.num_waiting}"
                    f" pulls waiting, {info.num_ack_pending} events unacked): stop every"
                    " instance before a rebuild; if one was killed, its unacked events are"
                    f" released after the consumer's ack_wait ({info.config.ack_wait} s)"
                )
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= _IDLE_PROOF_SECONDS:
            return
        await asyncio.sleep(_CATCH_UP_POLL_SECONDS)


def _durables(consumer_name: str) -> list[str]:
    return [subjects.event_store_durable(p, consumer_name) for p in range(PARTITIONS)]


async def _consumer_info(js: JetStreamContext, durable: str) -> ConsumerInfo | None:
    try:
        info: ConsumerInfo = await js.consumer_info(subjects.EVENTS_STREAM, durable)
    except NotFoundError:
        return None
    return info


async def rebuild(
    broker: ServiceBroker,
    clickhouse: ClickHouse,
    *,
    consumer_name: str,
    batch_size: int,
    flush_interval: float,
) -> int:
    """Rebuild every read model from the log; returns the number of conversations projected.
    Call `ensure_not_running` first (`run_rebuild` does, before it opens ClickHouse); `broker`
    is connected."""
    started = time.monotonic()
    js = jetstream(broker)
    await clickhouse.drop_all_tables()
    await clickhouse.migrate()
    for durable in _durables(consumer_name):
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(subjects.EVENTS_STREAM, durable)
    ingester = Ingester(
        broker,
        clickhouse,
        None,
        consumer_name=consumer_name,
        batch_size=batch_size,
        flush_interval=flush_interval,
    )
    await ingester.start()
    try:
        # Polled: the consumer's counters are the only record of what is still to come.
        while True:
            if await ingester.caught_up():
                break
            await asyncio.sleep(_CATCH_UP_POLL_SECONDS)
        # All of them: the ingest holds only its most recent ones in memory.
        rebuilt = await clickhouse.conversations(sql.ALL_CONVERSATIONS)
    finally:
        await ingester.stop()
    status_kv = ConversationStatusKV(await js.key_value(subjects.CONVERSATIONS_BUCKET))
    await status_kv.overwrite_all(rebuilt)
    log.info(
        "rebuilt %d conversations from %s in %.1f s",
        len(rebuilt),
        subjects.EVENTS_STREAM,
        time.monotonic() - started,
    )
    return len(rebuilt)
