"""Reading the event log, the settings bucket and the verdicts bucket (the NATS edge of
session-manager)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Collection

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from taskbus.contracts import subjects
from taskbus.contracts.commands import CommandVerdict, decode_verdict, encode_verdict
from taskbus.contracts.events import (
    AnyEvent,
    ConversationCreated,
    ConversationStatusChanged,
    MessageAction,
    RuntimeStatusChanged,
    UnknownEvent,
    decode_event,
)
from taskbus.contracts.partitions import PARTITIONS
from taskbus.contracts.specs import UserSettings
from taskbus.contracts.status import ACTIVE_STATUSES, LIVE_RUNTIME_STATUSES, ConversationStatus
from taskbus.contracts.streams import last_message, read_batch
from taskbus.contracts.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

_RECOVERY_BATCH = 1000
# The longest a copy of a user's settings serves (see `SettingsStore`).
SETTINGS_COPY_SECONDS = 5.0
# Events per batch direct get when reading a conversation's log.
_READ_PAGE = 1000


async def read_conversation(
    js: JetStreamContext, conversation_id: str
) -> list[AnyEvent | UnknownEvent]:
    """Every event of one conversation, in order, as stored at the time of reading."""
    return [event for _, event in await read_events(js, conversation_id)]


async def read_events(
    js: JetStreamContext, conversation_id: str, first: int = 1
) -> list[tuple[int, AnyEvent | UnknownEvent]]:
    """The conversation's events stored from stream sequence `first` to its last, each with
    its sequence: batch direct gets of `_READ_PAGE` events, one request each (a load's tail is
    one), where an ordered consumer paid a create and a delivery per event."""
    events: list[tuple[int, AnyEvent | UnknownEvent]] = []
    subject = subjects.conversation_events(conversation_id)
    while True:
        page, more = await read_batch(js, subject, first, _READ_PAGE)
        events += ((sequence, decode_event(data)) for sequence, data in page)
        if not more or not page:
            return events
        first = page[-1][0] + 1


async def conversation_exists(js: JetStreamContext, conversation_id: str) -> bool:
    """Whether the id is used: created, refused (ConversationRejected) for good, or deleted.
    A deleted conversation's log is purged, but event-store's entry in the conversations bucket
    (its tombstone) stays, so a re-sent CreateConversation never brings it back."""
    if await last_message(js, subjects.conversation_events(conversation_id)) is not None:
        return True
    try:
        await (await js.key_value(subjects.CONVERSATIONS_BUCKET)).get(conversation_id)
    except KeyNotFoundError:
        return False
    return True


async def conversations_to_recover(
    js: JetStreamContext, partitions: Collection[int] | None = None
) -> list[str]:
    """Conversations (of `partitions`, or all) that may need work after a restart or a
    hand-over: queued or holding a sandbox (ended ones included), or with a user message newer
    than their last status change."""
    kinds = (ConversationCreated, ConversationStatusChanged, RuntimeStatusChanged, MessageAction)
    every: list[int | None] = [None]
    chosen = every if partitions is None or len(partitions) == PARTITIONS else sorted(partitions)
    filters = [subjects.events_of_kind(k.__name__, p) for k in kinds for p in chosen]
    latest: dict[str, dict[str, AnyEvent | UnknownEvent]] = defaultdict(dict)
    for message in await _last_per_subject(js, filters):
        event = decode_event(message.data)
        latest[event.conversation_id][type(event).__name__] = event
    return [cid for cid, last in latest.items() if _may_need_work(last)]


def _may_need_work(last: dict[str, AnyEvent | UnknownEvent]) -> bool:
    """From a conversation's latest event of each kind that matters (by kind name)."""
    status = last.get(ConversationStatusChanged.__name__)
    if not isinstance(status, ConversationStatusChanged):
        return True  # created but never given a status: admission was interrupted
    if status.status in ACTIVE_STATUSES or status.status == ConversationStatus.QUEUED:
        return True
    if status.status == ConversationStatus.ERROR:
        return True  # to be cleaned up to STOPPED after its idle limit
    runtime = last.get(RuntimeStatusChanged.__name__)
    if isinstance(runtime, RuntimeStatusChanged) and runtime.status in LIVE_RUNTIME_STATUSES:
        return True  # ended, but its sandbox is still to be given back when idle
    message = last.get(MessageAction.__name__)
    return message is not None and message.id > status.id


async def _last_per_subject(js: JetStreamContext, filters: list[str]) -> list[Msg]:
    """The last message of every subject matching `filters`, streamed by a throwaway consumer.

    Listing subjects through stream info would stop at the server's 100,000 and cost a request
    per subject; this reads only what is needed, whatever the number of conversations. It stays
    on nats-py: a one-shot read of a known number of messages that ends by deleting its consumer,
    where FastStream's consumers run until stopped.
    """
    name = f"session_manager_recovery_{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        name=name,
        filter_subjects=filters,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=60,
    )
    info = await js.add_consumer(subjects.EVENTS_STREAM, config)
    messages: list[Msg] = []
    try:
        subscription = await js.pull_subscribe_bind(durable=name, stream=subjects.EVENTS_STREAM)
        remaining = info.num_pending or 0
        while remaining > 0:
            batch = await subscription.fetch(min(remaining, _RECOVERY_BATCH), timeout=10)
            messages += batch
            remaining = batch[-1].metadata.num_pending
        await subscription.unsubscribe()
    finally:
        await js.delete_consumer(subjects.EVENTS_STREAM, name)
    return messages


class Bucket:
    """A KV bucket, looked up on first use (not on every read and write)."""

    def __init__(self, js: JetStreamContext, name: str) -> None:
        self._js = js
        self._name = name
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(self._name)
        return self._kv

    async def _value(self, key: str) -> bytes | None:
        try:
            entry = await (await self._bucket()).get(key)
        except KeyNotFoundError:
            return None
        return entry.value


class SettingsStore(Bucket):
    """Per-user settings in KV `taskbus_settings` (key = user id).

    Every LLM step and admission reads them, so once `watch` runs they are kept in memory: a KV
    watch drops a user's copy as soon as any instance writes the key, and a copy serves for at
    most `SETTINGS_COPY_SECONDS`, which bounds what a watch that missed a write can leave stale
    (nats-py notices a restarted server only after two missed heartbeats, and resumes at the
    old sequence in a recreated bucket). `get(fresh=True)` reads the bucket: a create applies
    the settings the gateway has just shown the user as stored."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, subjects.SETTINGS_BUCKET)
        self._copies: dict[str, tuple[float, UserSettings | None]] = {}
        # Counts the writes the watch reported: a read that overlapped one is not kept.
        self._writes_seen = 0
        self._watch: asyncio.Task[None] | None = None

    async def watch(self) -> None:
        """Keep copies from now on (until `stop`), each dropped when its key is written; the
        watch first goes through every key's last write (None marks its end)."""
        watcher = await (await self._bucket()).watchall(meta_only=True)
        async for entry in watcher:
            if entry is None:
                break
        self._watch = asyncio.create_task(self._drop_written(watcher), name="settings-watch")

    async def stop(self) -> None:
        if self._watch is not None:
            await cancel_and_wait(self._watch)
            self._watch = None
        self._copies.clear()

    async def _drop_written(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is not None:  # None: the watch has caught up
                    self._writes_seen += 1
                    self._copies.pop(entry.key, None)
        finally:
            self._watch = None  # no longer told of writes: no copy serves
            self._copies.clear()
            with contextlib.suppress(nats.errors.Error):
                await watcher.stop()  # type: ignore[no-untyped-call]  # unannotated in nats-py

    async def get(self, user_id: str, *, fresh: bool = False) -> UserSettings | None:
        copy = self._copies.get(user_id)
        if copy is not None and not fresh and time.monotonic() < copy[0]:
            return copy[1]
        writes_seen = self._writes_seen
        settings = await self._read(user_id)
        if self._watch is not None and self._writes_seen == writes_seen:
            self._copies[user_id] = (time.monotonic() + SETTINGS_COPY_SECONDS, settings)
        return settings

    async def _read(self, user_id: str) -> UserSettings | None:
        value = await self._value(user_id)
        if value is None:
            return None
        try:
            return msgspec.json.decode(value, type=UserSettings)
        except msgspec.ValidationError:
            logger.error("ignoring invalid settings stored for user %s", user_id)
            return None

    async def put(self, user_id: str, update: UserSettings) -> None:
        """Replace the user's settings; an update without an API key keeps the stored one."""
        if update.llm_api_key is None:
            stored = await self.get(user_id, fresh=True)
            if stored is not None and stored.llm_api_key is not None:
                update = msgspec.structs.replace(update, llm_api_key=stored.llm_api_key)
        await (await self._bucket()).put(user_id, msgspec.json.encode(update))
        self._copies.pop(user_id, None)  # before the watch says so


class VerdictStore(Bucket):
    """Verdicts on conversation commands in KV `taskbus_verdicts` (key = command id): the put
    itself tells the waiting gateway, and a retried command finds the first one's verdict."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, subjects.VERDICTS_BUCKET)

    async def get(self, command_id: str) -> CommandVerdict | None:
        value = await self._value(command_id)
        if value is None:
            return None
        try:
            return decode_verdict(value)
        except msgspec.DecodeError:
            logger.error("ignoring an undecodable verdict stored for command %s", command_id)
            return None

    async def put(self, verdict: CommandVerdict) -> None:
        await (await self._bucket()).put(verdict.command_id, encode_verdict(verdict))
