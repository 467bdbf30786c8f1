"""What every consumer checks before acting on a message from the bus, and where refused ones go.

A holder of a NATS credential is trusted, but a bug (or a stolen credential) must not turn one
bad message into a file deleted on a host: an event is acted on only if it decodes, its
conversation id has the one allowed form (`subjects.require_conversation_id`), and that id and
its kind are the ones its subject names. A refused message is logged once, copied with the
reason to `taskbus.deadletter.<service>` (stream TASKBUS_DEADLETTER) and acked, never retried.
"""

from __future__ import annotations

import logging

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.commands import AnyCommand, command_subject, decode_command
from taskbus.contracts.events import AnyEvent, UnknownEvent, decode_event

logger = logging.getLogger(__name__)

REASON_HEADER = "Taskbus-Refused-Reason"
SUBJECT_HEADER = "Taskbus-Refused-Subject"
# A dead letter keeps at most this much of the refused payload, so it always fits max_payload.
MAX_KEPT_BYTES = 64 * 1024
_EVENT_SUBJECT_TOKENS = 5  # taskbus.events.<partition>.<conversation id>.<kind>


class Refused(Exception):
    """The message must not be acted on; `reason` says why (no secret, no full payload)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def inbound_event(subject: str, data: bytes) -> AnyEvent | UnknownEvent:
    """The event a message on `subject` carries, if it may be acted on; else `Refused`."""
    try:
        event = decode_event(data)
    except msgspec.MsgspecError as error:
        raise Refused(f"undecodable event: {error}") from None
    tokens = subject.split(".")
    if len(tokens) != _EVENT_SUBJECT_TOKENS or not subject.startswith(subjects.EVENTS_PREFIX + "."):
        raise Refused("not an event subject")
    _require_id(event.conversation_id)
    if event.conversation_id != subjects.conversation_id_of(subject):
        raise Refused("the payload's conversation id differs from the subject's")
    if event.kind != tokens[4]:
        raise Refused("the payload's kind differs from the subject's")
    if subject != subjects.event_subject(event.conversation_id, event.kind):
        raise Refused("the subject's partition is not the conversation's")
    return event


def inbound_command(subject: str, data: bytes) -> AnyCommand:
    """The command, if its conversation id (when it names one) has the allowed form and it came
    on its own subject (a conversation's partition: the instance that owns it applies it)."""
    try:
        command = decode_command(data)
    except msgspec.MsgspecError as error:
        raise Refused(f"invalid command: {error}") from None
    conversation_id = getattr(command, "conversation_id", None)
    if conversation_id is not None:
        _require_id(conversation_id)
    if subject != command_subject(command):
        raise Refused("not this command's subject")
    return command


def _require_id(conversation_id: str) -> None:
    try:
        subjects.require_conversation_id(conversation_id)
    except subjects.InvalidConversationId as error:
        raise Refused(str(error)) from None


class DeadLetters:
    """One service's dead-letter subject."""

    def __init__(self, js: JetStreamContext, service: str) -> None:
        self._js = js
        self._subject = subjects.dead_letter_subject(service)

    async def refuse(self, msg: Msg, refused: Refused) -> None:
        """Log once, keep a copy with the reason, and ack so it is never delivered again."""
        logger.warning("refused a message on %s: %s", msg.subject[:200], refused.reason)
        try:
            await self._js.publish(
                self._subject,
                msg.data[:MAX_KEPT_BYTES],
                stream=subjects.DEADLETTER_STREAM,
                headers={REASON_HEADER: refused.reason[:500], SUBJECT_HEADER: msg.subject[:500]},
            )
        except (nats.errors.Error, TimeoutError) as error:
            logger.error("dead letter of %s not kept: %r", msg.subject[:200], error)
        await msg.ack()
