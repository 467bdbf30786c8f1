"""Reading the event log and the settings bucket (the NATS edge of session-manager)."""

from __future__ import annotations

import logging

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.events import (
    AnyEvent,
    ConversationCreated,
    ConversationStatusChanged,
    MessageAction,
    RuntimeStatusChanged,
    UnknownEvent,
    decode_event,
)
from taskbus.contracts.specs import UserSettings
from taskbus.contracts.status import ACTIVE_STATUSES, LIVE_RUNTIME_STATUSES, ConversationStatus

logger = logging.getLogger(__name__)


async def read_conversation(
    js: JetStreamContext, conversation_id: str
) -> list[AnyEvent | UnknownEvent]:
    """Every event of one conversation, in order, as stored at the time of reading."""
    tail = await _last(js, subjects.conversation_events(conversation_id))
    if tail is None:
        return []
    sub = await js.subscribe(subjects.conversation_events(conversation_id), ordered_consumer=True)
    events: list[AnyEvent | UnknownEvent] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            events.append(decode_event(msg.data))
            if msg.metadata.sequence.stream >= tail:
                return events
    finally:
        await sub.unsubscribe()


async def _last(js: JetStreamContext, subject: str) -> int | None:
    """Stream sequence of the last message on `subject`, if any."""
    try:
        message = await js.get_last_msg(subjects.EVENTS_STREAM, subject, direct=True)
    except NotFoundError:
        return None
    return message.seq


async def _last_event(js: JetStreamContext, subject: str) -> AnyEvent | UnknownEvent | None:
    try:
        message = await js.get_last_msg(subjects.EVENTS_STREAM, subject, direct=True)
    except NotFoundError:
        return None
    assert message.data is not None
    return decode_event(message.data)


async def conversation_exists(js: JetStreamContext, conversation_id: str) -> bool:
    subject = subjects.event_subject(conversation_id, ConversationCreated.__name__)
    return await _last(js, subject) is not None


async def conversations_to_recover(js: JetStreamContext) -> list[str]:
    """Conversations that may need work after a restart: queued or holding a sandbox (ended
    ones included), or with a user message newer than their last status change."""
    created = subjects.event_subject("*", ConversationCreated.__name__)
    info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=created)
    found: list[str] = []
    for subject in info.state.subjects or {}:
        cid = subjects.conversation_id_of(subject)
        status = await _last_event(
            js, subjects.event_subject(cid, ConversationStatusChanged.__name__)
        )
        if not isinstance(status, ConversationStatusChanged):
            found.append(cid)  # created but never given a status: admission was interrupted
            continue
        if status.status in ACTIVE_STATUSES or status.status == ConversationStatus.QUEUED:
            found.append(cid)
            continue
        runtime = await _last_event(js, subjects.event_subject(cid, RuntimeStatusChanged.__name__))
        if isinstance(runtime, RuntimeStatusChanged) and runtime.status in LIVE_RUNTIME_STATUSES:
            found.append(cid)  # ended, but its sandbox is still to be given back when idle
            continue
        message = await _last_event(js, subjects.event_subject(cid, MessageAction.__name__))
        if message is not None and message.id > status.id:
            found.append(cid)
    return found


class SettingsStore:
    """Per-user settings in KV `taskbus_settings` (key = user id)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def get(self, user_id: str) -> UserSettings | None:
        kv = await self._js.key_value(subjects.SETTINGS_BUCKET)
        try:
            entry = await kv.get(user_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        try:
            return msgspec.json.decode(entry.value, type=UserSettings)
        except msgspec.ValidationError:
            logger.error("ignoring invalid settings stored for user %s", user_id)
            return None

    async def put(self, user_id: str, update: UserSettings) -> None:
        """Replace the user's settings; an update without an API key keeps the stored one."""
        if update.llm_api_key is None:
            stored = await self.get(user_id)
            if stored is not None and stored.llm_api_key is not None:
                update = msgspec.structs.replace(update, llm_api_key=stored.llm_api_key)
        kv = await self._js.key_value(subjects.SETTINGS_BUCKET)
        await kv.put(user_id, msgspec.json.encode(update))
