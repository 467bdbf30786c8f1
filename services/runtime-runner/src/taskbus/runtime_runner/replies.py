"""Has an event already been answered? Read from the log, so the answer survives restarts."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.events import (
    AnyEvent,
    CmdOutputChunk,
    Event,
    EventSource,
    RuntimeLost,
    RuntimeStatusChanged,
    UnknownEvent,
    decode_event,
)
from taskbus.contracts.status import RuntimeStatus


def is_reply(event: AnyEvent | UnknownEvent, to_id: int) -> bool:
    """A final answer of the runner to event `to_id`: not a live chunk, not "starting"."""
    if isinstance(event, UnknownEvent) or event.cause != to_id:
        return False
    if event.source != EventSource.ENVIRONMENT or isinstance(event, CmdOutputChunk):
        return False
    return not (isinstance(event, RuntimeStatusChanged) and event.status == RuntimeStatus.STARTING)


async def is_answered(
    js: JetStreamContext,
    conversation_id: str,
    event_id: int,
    stream_sequence: int,
    *,
    seen: Callable[[RawStreamMsg], None] | None = None,
) -> bool:
    """Scan the conversation's events after `stream_sequence` for a reply to `event_id`;
    `seen` is shown the conversation's last message, read on the way (the runner's appender
    places the reply after it).

    The common case (nothing after the event yet) costs one direct get of the last message.
    """
    conversation = subjects.conversation_events(conversation_id)
    try:
        last = await js.get_last_msg(subjects.EVENTS_STREAM, conversation, direct=True)
    except NotFoundError:
        return False
    assert last.seq is not None
    if seen is not None:
        seen(last)
    sequence = stream_sequence + 1
    while sequence <= last.seq:
        try:
            message = await js.get_msg(
                subjects.EVENTS_STREAM, sequence, subject=conversation, next=True, direct=True
            )
        except NotFoundError:
            return False
        assert message.seq is not None and message.data is not None
        if is_reply(decode_event(message.data), event_id):
            return True
        sequence = message.seq + 1
    return False


async def last_event(
    js: JetStreamContext, conversation_id: str, kind: type[Event]
) -> AnyEvent | UnknownEvent | None:
    """The conversation's latest event of one kind (one direct get), if it has any."""
    try:
        message = await js.get_last_msg(
            subjects.EVENTS_STREAM,
            subjects.event_subject(conversation_id, kind.__name__),
            direct=True,
        )
    except NotFoundError:
        return None
    assert message.data is not None
    return decode_event(message.data)


async def is_given_back(
    js: JetStreamContext, conversation_id: str, event_id: int, runner_id: str
) -> bool:
    """Was the conversation's runtime declared lost on this runner after event `event_id`? Then
    the event was meant for a sandbox this runner no longer owns (it was cut off, and came
    back): another runner, or nobody, serves the conversation now."""
    lost = await last_event(js, conversation_id, RuntimeLost)
    return isinstance(lost, RuntimeLost) and lost.runner_id == runner_id and lost.id > event_id
