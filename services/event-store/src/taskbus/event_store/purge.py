"""Delete means gone: a deleted conversation's events leave the log and ClickHouse.

The event-store purges, because it owns the read models and the tombstone (the KV entry of a
deleted conversation, see `status_kv.stored_value`), and it purges last, once every durable
consumer of the log has acked the conversation's last event. That order is what makes it safe:

- session-manager has folded the deletion, so it drives the conversation no further;
- the runtime-runner has removed the sandbox and the workspace: session-manager forwarded it
  the deletion (runner_work) before acking it, and the runner acks that work item, which
  leaves its queue, only once its report (RuntimeStatusChanged `deleted`) is in the log, a
  newer event of the conversation, so the wait starts over until the log stops growing;
- the event-store itself has written the tombstone (a batch is acked after its KV write).

A consumer has acked an event when `progress.has_acked` says so; a durable that does not exist
has nothing to process. Until the purge the gateway hides
the conversation (404 everywhere, never listed); after it, the tombstone answers for it: the
gateway's create finds the id deleted (409), session-manager's `conversation_exists` finds it
taken. JetStream cannot refuse an append by subject, so a writer appending after the purge (it
would have to answer an event it had already acked) is caught by the ingest instead: an event of
a conversation this process knows deleted schedules the purge again. (After a restart such a
straggler would be stored with no user, so no query could return it.)

The ClickHouse `conversations` row of a deleted conversation is the record of a purge to do: a
restarted event-store (or one after a rebuild that replayed a deletion not yet purged) purges
every ARCHIVED conversation it loads, and deletes that row last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.partitions import partition_of
from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.streams import last_message
from taskbus.contracts.tasks import cancel_and_wait
from taskbus.event_store.clickhouse import ClickHouse
from taskbus.event_store.progress import has_acked

log = logging.getLogger(__name__)

# The durable consumers that must have processed a conversation's events, by conversation id.
ConsumersOf = Callable[[str], Sequence[str]]

_POLL_SECONDS = 0.5
_RETRY_SECONDS = 2.0


def log_consumers(event_store_consumer: str) -> ConsumersOf:
    """The durable consumers of the log that must see a conversation's deletion before its
    purge: session-manager's and the event-store's of its partition. The runner reads its work
    queue instead (see `Purger._runner_work_done`)."""

    def of(conversation_id: str) -> tuple[str, ...]:
        partition = partition_of(conversation_id)
        return (
            subjects.session_manager_events_durable(partition),
            subjects.event_store_durable(partition, event_store_consumer),
        )

    return of


class Purger:
    """Purges deleted conversations in the background, one task per conversation."""

    def __init__(
        self, js: JetStreamContext, clickhouse: ClickHouse, consumers: ConsumersOf
    ) -> None:
        self._js = js
        self._clickhouse = clickhouse
        self._consumers_of = consumers
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def schedule(self, deleted: ConversationInfo) -> None:
        """Purge `deleted` once every consumer has processed it; a purge under way already
        waits for the conversation's log to stop growing."""
        cid = deleted.conversation_id
        if cid in self._tasks:
            return
        task = asyncio.create_task(self._purge(deleted), name=f"purge-{cid}")
        self._tasks[cid] = task
        task.add_done_callback(lambda _: self._tasks.pop(cid, None))

    async def stop(self) -> None:
        """Unfinished purges resume at the next start (their ClickHouse row is still there)."""
        await cancel_and_wait(*self._tasks.values())

    async def _purge(self, deleted: ConversationInfo) -> None:
        cid = deleted.conversation_id
        while True:
            try:
                await self._processed_by_all(cid)
                await self._js.purge_stream(
                    subjects.EVENTS_STREAM, subject=subjects.conversation_events(cid)
                )
                await self._clickhouse.delete_conversation(deleted.user_id, cid)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("purge of deleted conversation %s failed; retrying", cid)
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            log.info("purged deleted conversation %s from the log and ClickHouse", cid)
            return

    async def _processed_by_all(self, conversation_id: str) -> None:
        """Return once every consumer has acked the conversation's last event and no newer
        one has come meanwhile."""
        last = await self._last_sequence(conversation_id)
        while last:
            await self._acked_by_all(last, self._consumers_of(conversation_id))
            await self._runner_work_done(conversation_id)
            newest = await self._last_sequence(conversation_id)
            if newest == last:
                return
            last = newest

    async def _acked_by_all(self, sequence: int, consumers: Sequence[str]) -> None:
        """Polled: the consumers' counters are the only record of what they have processed.
        A consumer that has acked `sequence` stays past it, so only the others are asked again."""
        waiting = tuple(consumers)
        while True:
            acked = await asyncio.gather(*(self._has_acked(c, sequence) for c in waiting))
            waiting = tuple(c for c, done in zip(waiting, acked, strict=True) if not done)
            if not waiting:
                return
            await asyncio.sleep(_POLL_SECONDS)

    async def _runner_work_done(self, conversation_id: str) -> None:
        """Polled until the runner's work queue holds nothing of the conversation: session-
        manager forwarded the deletion before acking it, and the runner acks (removes) it once
        its report is in the log. A runner that never comes back holds the purge until its
        queue's max age."""
        while True:
            try:
                await self._js.get_last_msg(
                    subjects.RUNNER_WORK_STREAM, subjects.conversation_work(conversation_id)
                )
            except NotFoundError:
                return
            await asyncio.sleep(_POLL_SECONDS)

    async def _last_sequence(self, conversation_id: str) -> int:
        """The stream sequence of the conversation's last event; 0 if it has none (left)."""
        message = await last_message(self._js, subjects.conversation_events(conversation_id))
        return (message.seq or 0) if message is not None else 0

    async def _has_acked(self, consumer: str, sequence: int) -> bool:
        try:
            return await has_acked(self._js, consumer, sequence)
        except NotFoundError:
            return True  # a durable that does not exist has nothing to process
