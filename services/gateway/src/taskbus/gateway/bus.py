"""The gateway's NATS edge: commands out, queries to event-store, conversation state from the
KV projection with the log as the authority (read-your-writes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from taskbus.contracts import subjects
from taskbus.contracts.bus import connect
from taskbus.contracts.commands import (
    NOT_FOUND,
    QUEUE_FULL,
    Command,
    CommandVerdict,
    ConversationCommand,
    CreateConversation,
    UpdateSettings,
    command_subject,
    decode_verdict,
    encode_command,
)
from taskbus.contracts.events import (
    AnyEvent,
    ConversationCreated,
    ConversationRejected,
    Event,
    UnknownEvent,
)
from taskbus.contracts.inbound import Refused, inbound_event
from taskbus.contracts.lru import Lru
from taskbus.contracts.observability import trace_headers
from taskbus.contracts.observability_health import InstanceHealth, decode_health
from taskbus.contracts.openhands import OPENHANDS_STATUS
from taskbus.contracts.queries import ConversationInfo, Query, QueryError, Reply
from taskbus.contracts.runners import RunnerInfo, decode_runner_info
from taskbus.contracts.specs import UserSettings
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.streams import ensure_streams, last_message
from taskbus.contracts.summary import SHAPING, summary_of_latest
from taskbus.contracts.user_secrets import UserSecrets, decode_user_secrets
from taskbus.gateway.problems import Problem, conversation_not_found
from taskbus.gateway.reconnects import Reconnects
from taskbus.gateway.user_settings import reflects

logger = logging.getLogger(__name__)


def _checked(subject: str, data: bytes) -> AnyEvent | UnknownEvent | None:
    """The event, unless every consumer refuses it (e.g. forged with another conversation's
    id): such a message changes no conversation, so the fold takes it as absent."""
    try:
        return inbound_event(subject, data)
    except Refused as refused:
        logger.warning("ignoring a refused event on %s: %s", subject[:200], refused.reason)
        return None


class LogTail(msgspec.Struct, frozen=True, kw_only=True):
    """The last event of a conversation in the log."""

    id: int
    timestamp: datetime


E = TypeVar("E", bound=Event)
R = TypeVar("R", bound=Reply)
T = TypeVar("T")

# How often a POST waiting for its conversation or its command's verdict checks for a
# reconnect (which may have lost the notification it waits for); checking reads nothing.
_RECONNECT_CHECK_SECONDS = 0.25
# The events that answer a CreateConversation, by the last token of their subject.
_ANSWERS: dict[str, type[Event]] = {
    kind.__name__: kind for kind in (ConversationCreated, ConversationRejected)
}
# How often a settings PUT re-reads the KV entry while waiting for session-manager's write.
_STORED_POLL_SECONDS = 0.05
# Pause between reconnect attempts: short, as open WebSockets wait on the reconnect.
_RECONNECT_WAIT_SECONDS = 0.5
# Conversations whose owner this process has read (an owner never changes): about 1 MB.
_MAX_KNOWN_OWNERS = 10_000


def unavailable(what: str) -> Problem:
    return Problem(
        503,
        f"{what} did not answer in time",
        kind="service-unavailable",
        headers={"Retry-After": "1"},
    )


def unconfirmed_write() -> Problem:
    """JetStream did not acknowledge a command: it is down, or it cannot store (a full or
    failing disk makes nats-server stop the stream without an error reply, until restarted)."""
    return Problem(
        503,
        "the command log did not confirm the write in time: NATS JetStream is unreachable, or"
        " its storage is full or failing; retry with the same Idempotency-Key (a retry is never"
        " applied twice)",
        kind="service-unavailable",
        reason="log_write_unconfirmed",
        headers={"Retry-After": "5"},
    )


def refusal(verdict: CommandVerdict) -> Problem:
    """The problem a refused command answers with: 409 with the current status (OpenHands'
    word and Taskbus' own) and why."""
    cid = verdict.conversation_id
    if verdict.reason == NOT_FOUND:
        return conversation_not_found(cid)
    if verdict.reason == QUEUE_FULL:
        return Problem(
            429,
            verdict.detail,
            kind="queue-full",
            title="Conversation refused",
            conversation_id=cid,
        )
    current = verdict.status
    return Problem(
        409,
        verdict.detail,
        kind="command-refused",
        title="Command refused",
        conversation_id=cid,
        conversation_status=None if current is None else OPENHANDS_STATUS[current],
        taskbus_status=current,
        reason=verdict.reason,
    )


def _rejection(rejected: ConversationRejected) -> Problem:
    """The 429 a conversation session-manager refused to create answers with."""
    return Problem(
        429,
        rejected.detail or rejected.reason,
        kind=rejected.reason.replace("_", "-"),
        title="Conversation refused",
        conversation_id=rejected.conversation_id,
    )


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
        self._verdicts: KeyValue | None = None
        self._owners: Lru[str, str] = Lru(_MAX_KNOWN_OWNERS)  # conversation id -> user id

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
                command_subject(command),
                encode_command(command),
                stream=subjects.COMMANDS_STREAM,
                headers=trace_headers({"Nats-Msg-Id": msg_id}),  # session-manager continues it
                timeout=self._timeout,
            )
        except nats.errors.MaxPayloadError as error:
            raise too_large_for_the_bus(error) from error
        except (nats.errors.Error, TimeoutError) as error:
            logger.warning("publishing %s failed: %r", command.name(), error)
            raise unconfirmed_write() from error

    async def send_command(
        self, command: ConversationCommand, command_id: str, *, fresh_id: bool
    ) -> CommandVerdict:
        """Send a conversation command and wait (bounded) for session-manager's verdict: an
        accepted one's events are in the log when this returns; a refused one raises its
        Problem (409, or 404 / 429). The verdict's key is watched from before the publish, and
        read from the bucket once after it, for a retry JetStream dropped as a duplicate of the
        first (`command_id` is also the Nats-Msg-Id). A `fresh_id` (made for this command
        alone) has no earlier verdict, so it is not read then. Otherwise only a reconnect,
        which may have lost the put's notification, makes us read it: not a timer, which would
        add reads exactly while session-manager is slow. 504 past the timeout."""
        command = msgspec.structs.replace(command, command_id=command_id, fresh_id=fresh_id)
        reconnects_seen = self.reconnects.count
        notifications = await self.nc.subscribe(subjects.verdict_subject(command_id))
        try:
            await self.publish_command(command, msg_id=command_id)
            deadline = time.monotonic() + self._timeout
            verdict = None if fresh_id else await self._stored_verdict(command_id)
            while verdict is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Problem(
                        504,
                        "the command was sent but session-manager has not answered yet; retry "
                        "with the same Idempotency-Key to learn its outcome",
                        kind="verdict-pending",
                        conversation_id=command.conversation_id,
                    )
                try:
                    message = await notifications.next_msg(
                        timeout=min(remaining, _RECONNECT_CHECK_SECONDS)
                    )
                except TimeoutError:
                    if self.reconnects.count != reconnects_seen:
                        reconnects_seen = self.reconnects.count
                        verdict = await self._stored_verdict(command_id)
                else:
                    verdict = decode_verdict(message.data)
        finally:
            await notifications.unsubscribe()
        if verdict.conversation_id != command.conversation_id:  # only for a forged collision
            raise Problem(409, "command id already used", kind="conflict")
        if not verdict.accepted:
            raise refusal(verdict)
        return verdict

    async def _stored_verdict(self, command_id: str) -> CommandVerdict | None:
        try:
            if self._verdicts is None:
                self._verdicts = await self.js.key_value(subjects.VERDICTS_BUCKET)
            entry = await self._verdicts.get(command_id)
        except KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as error:
            raise unavailable("the verdicts bucket") from error
        return decode_verdict(entry.value or b"")

    async def create_conversation(
        self, command: CreateConversation
    ) -> tuple[ConversationInfo, bool]:
        """Ask session-manager to create the conversation and wait until the log shows it.

        Returns the conversation and whether this call created it (False: an earlier request
        with the same id did). Raises a 409 Problem if that conversation has been deleted, a
        429 one if session-manager refused it (now or for an earlier request with the same id),
        a 504 one if it is not visible in time.

        Subscribed to the conversation's events before anything is read, so the answer cannot
        be missed: the log is read once up front, then when a ConversationCreated or
        ConversationRejected is notified, not per event nor on a timer while session-manager
        is busy. A notification may come before JetStream has stored its message (or be of a
        write it refused), so the log confirms it, read again at each wake-up until it does.
        A reconnect, which loses the notifications sent meanwhile, makes it read all again.
        """
        cid = command.conversation_id
        reconnects_seen = self.reconnects.count
        notifications = await self.nc.subscribe(subjects.conversation_events(cid))
        try:
            existing = await self._visible(cid)
            if existing is not None:
                return existing, False
            await self.publish_command(command, msg_id=f"{command.name()}:{cid}")
            deadline = time.monotonic() + self._timeout
            answer: type[Event] | None = None  # notified, not yet confirmed by the log
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Problem(
                        504,
                        "the conversation was accepted but is not visible yet; retry the GET",
                        kind="not-visible-yet",
                        conversation_id=cid,
                    )
                with contextlib.suppress(TimeoutError):
                    message = await notifications.next_msg(
                        timeout=min(remaining, _RECONNECT_CHECK_SECONDS)
                    )
                    answer = _ANSWERS.get(message.subject.rpartition(".")[2], answer)
                if self.reconnects.count != reconnects_seen:
                    reconnects_seen = self.reconnects.count
                    info = await self._visible(cid)
                elif answer is not None:
                    info = await self._confirmed(cid, answer)
                else:
                    continue
                if info is not None:
                    return info, True
        finally:
            await notifications.unsubscribe()

    async def _visible(self, conversation_id: str) -> ConversationInfo | None:
        """The conversation if the log (or its projection) shows it; a 409 Problem if it was
        deleted, a 429 one if session-manager refused it."""
        info, rejected = await asyncio.gather(
            self.find_conversation(conversation_id),
            self.last_event(conversation_id, ConversationRejected),
        )
        if info is not None and info.status is ConversationStatus.ARCHIVED:
            # Its tombstone outlives the purged log: a deleted conversation never comes back.
            raise Problem(
                409,
                "this Idempotency-Key named a conversation that has been deleted; use a new key",
                kind="conversation-deleted",
                title="Conversation deleted",
            )
        if info is None and rejected is not None:
            raise _rejection(rejected)
        return info

    async def _confirmed(
        self, conversation_id: str, answer: type[Event]
    ) -> ConversationInfo | None:
        """The conversation as first visible (its ConversationCreated alone) or a 429 Problem
        for a refusal, once the log holds the `answer` notified; None until it does."""
        if answer is ConversationRejected:
            rejected = await self.last_event(conversation_id, ConversationRejected)
            if rejected is not None:
                raise _rejection(rejected)
            return None
        created = await self.last_event(conversation_id, ConversationCreated)
        if created is None:
            return None
        return summary_of_latest(created, (), created.id, created.timestamp)

    # --- conversation state -------------------------------------------------------------------

    async def find_conversation(self, conversation_id: str) -> ConversationInfo | None:
        """The KV projection when it is as new as the log, else the same summary folded from
        the log's latest events of each kind that shapes it (contracts.summary)."""
        projected, tail = await asyncio.gather(
            self._projected(conversation_id), self._log_tail(conversation_id)
        )
        if tail is None:
            return projected
        if projected is not None and projected.last_event_id >= tail.id:
            return projected
        created, *latest = await asyncio.gather(
            self.last_event(conversation_id, ConversationCreated),
            *(self.last_event(conversation_id, kind) for kind in SHAPING),
        )
        if not isinstance(created, ConversationCreated):
            return None
        return summary_of_latest(created, latest, tail.id, tail.timestamp)

    async def owned_conversation(self, user_id: str, conversation_id: str) -> ConversationInfo:
        """The user's conversation, or a 404 Problem (also for another user's conversation, and
        for a deleted one, even to its owner: deleted means gone)."""
        if subjects.is_valid_conversation_id(conversation_id):
            info = await self.find_conversation(conversation_id)
            if (
                info is not None
                and info.user_id == user_id
                and info.status is not ConversationStatus.ARCHIVED
            ):
                self._owners.put(conversation_id, user_id)
                return info
        raise conversation_not_found(conversation_id)

    async def check_owner(self, user_id: str, conversation_id: str) -> None:
        """A 404 Problem unless the conversation is the user's, read from the log once per
        conversation: an owner never changes, so later commands (a user's messages, the hot
        path) publish at once. Deleted since is session-manager's verdict, a 404 as well."""
        if self._owners.get(conversation_id) == user_id:
            return
        await self.owned_conversation(user_id, conversation_id)

    async def last_event(self, conversation_id: str, event_type: type[E]) -> E | None:
        message = await self._last_message(
            subjects.event_subject(conversation_id, event_type.__name__)
        )
        event = None if message is None else _checked(*message)
        return event if isinstance(event, event_type) else None

    async def _log_tail(self, conversation_id: str) -> LogTail | None:
        message = await self._last_message(subjects.conversation_events(conversation_id))
        if message is None or _checked(*message) is None:
            return None
        return msgspec.json.decode(message[1], type=LogTail)

    async def _last_message(self, subject: str) -> tuple[str, bytes] | None:
        """(subject, data) of the last message on `subject` (a wildcard or not)."""
        try:
            message = await last_message(self.js, subject)
        except (nats.errors.Error, TimeoutError) as error:
            raise unavailable("the event log") from error
        if message is None:
            return None
        assert message.subject is not None and message.data is not None
        return message.subject, message.data

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

    async def user_secrets(self, user_id: str) -> UserSecrets:
        """The user's entry in KV `taskbus_secrets` (sealed values; read-only here), empty when
        there is none."""
        try:
            bucket = await self.js.key_value(subjects.SECRETS_BUCKET)
            entry = await bucket.get(user_id)
        except KeyNotFoundError:
            return UserSecrets()
        except (nats.errors.Error, TimeoutError) as error:
            raise unavailable("the secrets store") from error
        try:
            return decode_user_secrets(entry.value or b"{}")
        except msgspec.DecodeError:
            logger.error("undecodable secrets stored for user %s", user_id)
            raise unavailable("the secrets store") from None

    async def update_settings(self, command: UpdateSettings) -> UserSettings:
        """Ask session-manager (the bucket's writer) to store the settings and wait until the KV
        entry shows them (read-your-writes). Raises a 504 Problem past the timeout."""

        async def stored() -> UserSettings | None:
            settings = await self.user_settings(command.user_id)
            shown = settings is not None and reflects(settings, command.settings)
            return settings if shown else None

        return await self.publish_until_stored(
            command, stored, "the settings were accepted but are not stored yet; retry the GET"
        )

    async def publish_until_stored(
        self, command: Command, stored: Callable[[], Awaitable[T | None]], not_yet: str
    ) -> T:
        """Send a change to session-manager (the only writer of the settings and secrets
        buckets) and wait until `stored` reads it back: read-your-writes. A fresh message id
        each time: repeating such a write stores the same. A 504 Problem saying `not_yet` past
        the timeout."""
        await self.publish_command(command, msg_id=uuid.uuid4().hex)
        deadline = time.monotonic() + self._timeout
        while (found := await stored()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Problem(504, not_yet, kind="not-visible-yet")
            await asyncio.sleep(min(remaining, _STORED_POLL_SECONDS))
        return found

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
            retry = reply.retry_after_seconds
            raise Problem(
                reply.status,
                reply.detail,
                title=reply.title,
                kind=reply.kind,
                headers=None if retry is None else {"Retry-After": str(retry)},
            )
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
        sandboxes run under. Raises a 503 Problem if the bucket cannot be read."""
        return await self._entries(subjects.RUNNERS_BUCKET, decode_runner_info, "runner registry")

    async def service_health(self) -> list[InstanceHealth]:
        """Each service instance's last readiness heartbeat (KV `taskbus_health`)."""
        return await self._entries(subjects.HEALTH_BUCKET, decode_health, "health registry")

    async def _entries(self, bucket_name: str, decode: Callable[[bytes], T], what: str) -> list[T]:
        """Every entry of a small bucket, decoded. Keys come from the bucket's stream info and
        values from direct gets, so no consumer is needed. Raises a 503 Problem if the bucket
        cannot be read; an undecodable entry is skipped (and logged)."""
        stream = f"KV_{bucket_name}"
        prefix = f"$KV.{bucket_name}."
        entries = []
        try:
            async with asyncio.timeout(self._timeout):
                info = await self.js.stream_info(stream, subjects_filter=f"{prefix}>")
                bucket = await self.js.key_value(bucket_name)
                for subject in sorted(info.state.subjects or {}):
                    with contextlib.suppress(KeyNotFoundError):  # deleted since it was listed
                        entries.append(await bucket.get(subject.removeprefix(prefix)))
        except (nats.errors.Error, TimeoutError) as error:
            raise unavailable(f"the {what}") from error
        decoded = []
        for entry in entries:
            try:
                decoded.append(decode(entry.value or b""))
            except msgspec.DecodeError:
                logger.warning("undecodable entry %s in the %s", entry.key, what)
        return decoded
