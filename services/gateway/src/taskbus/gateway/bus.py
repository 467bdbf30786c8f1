"""The gateway's NATS edge: commands out, queries to event-store, conversation state from the
KV projection with the log as the authority (read-your-writes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect
from taskbus.contracts.commands import (
    Command,
    CreateConversation,
    UpdateSettings,
    encode_command,
)
from taskbus.contracts.events import (
    AgentStateChanged,
    ConversationCreated,
    ConversationDeleted,
    ConversationRejected,
    ConversationStatusChanged,
    Event,
    LLMMetrics,
)
from taskbus.contracts.queries import ConversationInfo, Query, QueryError, Reply
from taskbus.contracts.runners import RunnerInfo, decode_runner_info
from taskbus.contracts.specs import UserSettings
from taskbus.contracts.streams import ensure_streams
from taskbus.gateway.conversations import LogTail, fold_conversation
from taskbus.gateway.problems import Problem, conversation_not_found
from taskbus.gateway.reconnects import Reconnects
from taskbus.gateway.user_settings import reflects

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
R = TypeVar("R", bound=Reply)

# How often a waiting POST re-reads the log when no ConversationCreated notification arrives.
_VISIBILITY_POLL_SECONDS = 0.25
# How often a settings PUT re-reads the KV entry while waiting for session-manager's write.
_SETTINGS_POLL_SECONDS = 0.05
# Pause between reconnect attempts: short, as open WebSockets wait on the reconnect.
_RECONNECT_WAIT_SECONDS = 0.5


def unavailable(what: str) -> Problem:
    return Problem(503, f"{what} did not answer in time", kind="service-unavailable")


def too_large_for_the_bus(error: nats.errors.MaxPayloadError) -> Problem:
    """A message the bus cannot carry: the request was too large (field limits keep valid
    requests far below max_payload, so this is a last line, never a 5xx)."""
    return Problem(413, f"the request is too large for the bus: {error}", kind="content-too-large")


class Bus:
    """One NATS connection shared by every request of the process."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        reconnects: Reconnects,
        conversations: KeyValue,
        settings: KeyValue,
        timeout: float,
    ) -> None:
        self.nc = nc
        self.js = js
        self.reconnects = reconnects
        self._conversations = conversations
        self._settings = settings
        self._timeout = timeout
        self._reply_decoders: dict[type[Reply], msgspec.json.Decoder[Any]] = {}

    @classmethod
    async def connect(cls, url: str, wait_seconds: float, stream_replicas: int = 1) -> Bus:
        """`wait_seconds` bounds every wait on another service (visibility, queries)."""
        reconnects = Reconnects()
        nc = await connect(
            url,
            "taskbus-gateway",
            reconnected_cb=reconnects.notify,
            # Never give up: the gateway outlives any nats-server restart.
            max_reconnect_attempts=-1,
            reconnect_time_wait=_RECONNECT_WAIT_SECONDS,
        )
        js = nc.jetstream()
        await ensure_streams(js, stream_replicas)
        conversations = await js.key_value(subjects.CONVERSATIONS_BUCKET)
        settings = await js.key_value(subjects.SETTINGS_BUCKET)
        return cls(nc, js, reconnects, conversations, settings, wait_seconds)

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    # --- commands -----------------------------------------------------------------------------

    async def publish_command(self, command: Command, msg_id: str) -> None:
        """Publish to TASKBUS_COMMANDS; JetStream drops a repeated `msg_id` (idempotent retry)."""
        try:
            await self.js.publish(
                subjects.command_subject(subjects.SESSION_MANAGER, command.name()),
                encode_command(command),
                stream=subjects.COMMANDS_STREAM,
                headers={"Nats-Msg-Id": msg_id},
                timeout=self._timeout,
            )
        except nats.errors.MaxPayloadError as error:
            raise too_large_for_the_bus(error) from error
        except (nats.errors.Error, TimeoutError) as error:
            logger.warning("publishing %s failed: %r", command.name(), error)
            raise unavailable("the command stream") from error

    async def create_conversation(
        self, command: CreateConversation
    ) -> tuple[ConversationInfo, bool]:
        """Ask session-manager to create the conversation and wait until the log shows it.

        Returns the conversation and whether this call created it (False: an earlier request
        with the same id did). Raises a 429 Problem if session-manager refused it (now or
        for an earlier request with the same id), a 504 one if it is not visible in time.
        """
        cid = command.conversation_id
        existing = await self.find_conversation(cid)
        if existing is not None:
            return existing, False
        await self._raise_if_rejected(cid)
        # Subscribe before publishing so the answer's notification (ConversationCreated or
        # ConversationRejected) cannot be missed; the log stays the authority, the
        # notification only wakes us up early.
        notifications = await self.nc.subscribe(subjects.conversation_events(cid))
        try:
            await self.publish_command(command, msg_id=f"{command.name()}:{cid}")
            deadline = time.monotonic() + self._timeout
            while (info := await self.find_conversation(cid)) is None:
                await self._raise_if_rejected(cid)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Problem(
                        504,
                        "the conversation was accepted but is not visible yet; retry the GET",
                        kind="not-visible-yet",
                        conversation_id=cid,
                    )
                with contextlib.suppress(TimeoutError):
                    await notifications.next_msg(timeout=min(remaining, _VISIBILITY_POLL_SECONDS))
            return info, True
        finally:
            await notifications.unsubscribe()

    async def _raise_if_rejected(self, conversation_id: str) -> None:
        rejected = await self.last_event(conversation_id, ConversationRejected)
        if rejected is not None:
            raise Problem(
                429,
                rejected.detail or rejected.reason,
                kind=rejected.reason.replace("_", "-"),
                title="Conversation refused",
                conversation_id=conversation_id,
            )

    # --- conversation state -------------------------------------------------------------------

    async def find_conversation(self, conversation_id: str) -> ConversationInfo | None:
        """The KV projection when it is as new as the log, else a fold of the log itself."""
        projected, tail = await asyncio.gather(
            self._projected(conversation_id), self._log_tail(conversation_id)
        )
        if tail is None:
            return projected
        if projected is not None and projected.last_event_id >= tail.id:
            return projected
        created, status, agent_state, metrics, deleted = await asyncio.gather(
            self.last_event(conversation_id, ConversationCreated),
            self.last_event(conversation_id, ConversationStatusChanged),
            self.last_event(conversation_id, AgentStateChanged),
            self.last_event(conversation_id, LLMMetrics),
            self.last_event(conversation_id, ConversationDeleted),
        )
        if created is None:
            return None
        return fold_conversation(created, tail, status, agent_state, metrics, deleted)

    async def owned_conversation(self, user_id: str, conversation_id: str) -> ConversationInfo:
        """The user's conversation, or a 404 Problem (also for another user's conversation)."""
        if subjects.is_valid_conversation_id(conversation_id):
            info = await self.find_conversation(conversation_id)
            if info is not None and info.user_id == user_id:
                return info
        raise conversation_not_found(conversation_id)

    async def last_event(self, conversation_id: str, event_type: type[E]) -> E | None:
        message = await self._last_message(
            subjects.event_subject(conversation_id, event_type.__name__)
        )
        return None if message is None else msgspec.json.decode(message, type=event_type)

    async def _log_tail(self, conversation_id: str) -> LogTail | None:
        message = await self._last_message(subjects.conversation_events(conversation_id))
        return None if message is None else msgspec.json.decode(message, type=LogTail)

    async def _last_message(self, subject: str) -> bytes | None:
        try:
            message = await self.js.get_last_msg(subjects.EVENTS_STREAM, subject, direct=True)
        except NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as error:
            raise unavailable("the event log") from error
        return message.data

    async def _projected(self, conversation_id: str) -> ConversationInfo | None:
        try:
            entry = await self._conversations.get(conversation_id)
        except KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as error:
            raise unavailable("the conversation projection") from error
        if not entry.value:
            return None
        try:
            return msgspec.json.decode(entry.value, type=ConversationInfo)
        except msgspec.DecodeError:
            logger.warning("undecodable projection of conversation %s; using the log", entry.key)
            return None

    # --- user settings ------------------------------------------------------------------------

    async def user_settings(self, user_id: str) -> UserSettings | None:
        """The user's stored settings (with the API key: callers redact), None if none."""
        try:
            entry = await self._settings.get(user_id)
        except KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as error:
            raise unavailable("the settings store") from error
        if not entry.value:
            return None
        try:
            return msgspec.json.decode(entry.value, type=UserSettings)
        except msgspec.DecodeError:
            logger.warning("undecodable settings of user %s; serving the defaults", user_id)
            return None

    async def update_settings(self, command: UpdateSettings) -> UserSettings:
        """Ask session-manager (the bucket's writer) to store the settings and wait until the KV
        entry shows them (read-your-writes). Raises a 504 Problem past the timeout."""
        # A fresh id each time: a repeated PUT is harmless (it stores the same settings).
        await self.publish_command(command, msg_id=uuid.uuid4().hex)
        deadline = time.monotonic() + self._timeout
        while True:
            stored = await self.user_settings(command.user_id)
            if stored is not None and reflects(stored, command.settings):
                return stored
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Problem(
                    504,
                    "the settings were accepted but are not stored yet; retry the GET",
                    kind="not-visible-yet",
                )
            await asyncio.sleep(min(remaining, _SETTINGS_POLL_SECONDS))

    # --- queries ------------------------------------------------------------------------------

    async def ask(self, query: Query, reply_type: type[R]) -> R:
        """Request-reply to event-store; a QueryError becomes a Problem with its status."""
        try:
            message = await self.nc.request(
                subjects.query_subject(query.subject_name),
                msgspec.json.encode(query),
                timeout=self._timeout,
            )
        except nats.errors.MaxPayloadError as error:
            raise too_large_for_the_bus(error) from error
        except (nats.errors.Error, TimeoutError) as error:
            raise unavailable("event-store") from error
        try:
            reply = self._reply_decoder(reply_type).decode(message.data)
        except msgspec.DecodeError as error:
            logger.error("event-store answered %s with an undecodable reply", query.subject_name)
            raise Problem(502, "event-store answered with an unexpected reply") from error
        if isinstance(reply, QueryError):
            raise Problem(reply.status, reply.detail, title=reply.title, kind=reply.kind)
        assert isinstance(reply, reply_type)
        return reply

    def _reply_decoder(self, reply_type: type[Reply]) -> msgspec.json.Decoder[Any]:
        decoder = self._reply_decoders.get(reply_type)
        if decoder is None:
            decoder = msgspec.json.Decoder(reply_type | QueryError)
            self._reply_decoders[reply_type] = decoder
        return decoder

    # --- runners ------------------------------------------------------------------------------

    async def runners(self) -> list[RunnerInfo]:
        """What each runtime-runner says of itself (KV `taskbus_runners`): the isolation its
        sandboxes run under. Keys come from the bucket's stream info and values from direct
        gets, so no consumer is needed. Raises a 503 Problem if the bucket cannot be read."""
        stream = f"KV_{subjects.RUNNERS_BUCKET}"
        prefix = f"$KV.{subjects.RUNNERS_BUCKET}."
        entries = []
        try:
            async with asyncio.timeout(self._timeout):
                info = await self.js.stream_info(stream, subjects_filter=f"{prefix}>")
                bucket = await self.js.key_value(subjects.RUNNERS_BUCKET)
                for subject in sorted(info.state.subjects or {}):
                    with contextlib.suppress(KeyNotFoundError):  # deleted since it was listed
                        entries.append(await bucket.get(subject.removeprefix(prefix)))
        except (nats.errors.Error, TimeoutError) as error:
            raise unavailable("the runner registry") from error
        runners = []
        for entry in entries:
            try:
                runners.append(decode_runner_info(entry.value or b""))
            except msgspec.DecodeError:
                logger.warning("undecodable entry of runner %s in the registry", entry.key)
        return runners
