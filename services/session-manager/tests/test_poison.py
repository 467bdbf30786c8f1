"""A poison message (issue 13): one whose handling fails on every delivery is given up after a
bounded number of them, kept as a dead letter with the reason, and told on its conversation as
an `ErrorObservation` (`message_given_up`), never retried forever nor dropped silently.

The poison is natural: a forged event in a conversation's log (it decodes as an envelope, but
not as its kind) makes every fold of that conversation fail, and so every command and every
event about it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import msgspec
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.commands import SendMessage, command_subject
from taskbus.contracts.events import ErrorObservation, EventSource, MessageAction, decode_event
from taskbus.contracts.inbound import REASON_HEADER, SUBJECT_HEADER
from taskbus.contracts.partitions import partition_of
from taskbus.session_manager.partition_consumers import (
    COMMANDS_MAX_DELIVER,
    EVENTS_POISON_DELIVERIES,
)
from taskbus.session_manager.service import GIVEN_UP

from .test_agent_loop import agent_stack, send
from .test_consumers import all_acked, eventually

GIVEN_UP_REASON = "failed on all {} deliveries: ValidationError"


async def _dead_letters(js: JetStreamContext, wanted: set[tuple[str, str]]) -> None:
    """Return once the session-manager's dead letters include each (subject, reason)."""
    sub = await js.subscribe(
        subjects.dead_letter_subject(subjects.SESSION_MANAGER),
        stream=subjects.DEADLETTER_STREAM,
        ordered_consumer=True,
    )
    try:
        while wanted:
            msg = await sub.next_msg(timeout=60)
            headers = msg.headers or {}
            wanted.discard((headers.get(SUBJECT_HEADER, ""), headers.get(REASON_HEADER, "")))
    finally:
        await sub.unsubscribe()


async def _error_events(js: JetStreamContext, cid: str) -> list[ErrorObservation]:
    """The conversation's error events, read from the log (skipping the forged one)."""
    sub = await js.subscribe(
        subjects.conversation_events(cid), stream=subjects.EVENTS_STREAM, ordered_consumer=True
    )
    found: list[ErrorObservation] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except TimeoutError:
                return found
            try:
                event = decode_event(msg.data)
            except msgspec.ValidationError:
                continue
            if isinstance(event, ErrorObservation):
                found.append(event)
    finally:
        await sub.unsubscribe()


async def test_a_command_and_an_event_failing_on_every_delivery_are_dead_lettered_and_told(
    tmp_path: Path,
) -> None:
    async with agent_stack(tmp_path, None) as stack:
        js = stack.js
        cid = uuid.uuid4().hex
        forged = {"kind": "MessageAction", "conversation_id": cid, "id": 0, "source": "forged"}
        await js.publish(subjects.event_subject(cid, "MessageAction"), msgspec.json.encode(forged))
        command = SendMessage(user_id="lena", conversation_id=cid, content="Hello?")
        await send(js, command, "SendMessage")
        psst = MessageAction(conversation_id=cid, source=EventSource.USER, content="Psst")
        await EventAppender(js).append(psst)
        event_subject = subjects.event_subject(cid, "MessageAction")
        error_subject = subjects.event_subject(cid, "ErrorObservation")

        await _dead_letters(
            js,
            {
                (command_subject(command), GIVEN_UP_REASON.format(COMMANDS_MAX_DELIVER)),
                (event_subject, GIVEN_UP_REASON.format(EVENTS_POISON_DELIVERIES)),
            },
        )
        # Each was told on the conversation; its error event (whose fold fails too) is given up
        # in turn, with no error event about it.
        await _dead_letters(js, {(error_subject, GIVEN_UP_REASON.format(EVENTS_POISON_DELIVERIES))})
        errors = await _error_events(js, cid)
        assert sorted(e.code for e in errors) == [GIVEN_UP, GIVEN_UP]
        assert any(command_subject(command) in e.content for e in errors)
        assert any(event_subject in e.content for e in errors)
        assert not any("Hello?" in e.content or "Psst" in e.content for e in errors)
        durable = subjects.session_manager_commands_durable(partition_of(cid))
        # Settled, not retried: nothing pending or waiting for an ack.
        await eventually(lambda: all_acked(js, subjects.COMMANDS_STREAM, durable))
        events = subjects.session_manager_events_durable(partition_of(cid))
        await eventually(lambda: all_acked(js, subjects.EVENTS_STREAM, events), seconds=30)
        assert len(await _error_events(js, cid)) == 2
