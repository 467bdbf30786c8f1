"""Work for one runtime-runner: the events a runner acts on, forwarded from the log to the runner
its conversation is placed on (`RuntimeRequested.runner_id`).

The conversation's owner (session-manager, which consumes its partitions' events in log order)
forwards each such event before it acks it, to `taskbus.runner.<runner id>.<event subject
tail>` with `Nats-Msg-Id` `<conversation id>:<event id>`. A forwarder that dies before its ack
is redelivered the event and forwards it again: JetStream drops the copy inside the dedupe
window, and past it the runner's reply check (`replies.is_answered`, which looks after the
event's own log sequence, carried in `EVENT_SEQUENCE_HEADER`) finds the answer. Either way an
action runs once.
"""

from __future__ import annotations

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.events import (
    AnyEvent,
    CmdRunAction,
    ConversationDeleted,
    Event,
    FileEditAction,
    FileReadAction,
    FileWriteAction,
    MCPAction,
    RuntimeControlRequested,
    RuntimeRequested,
    UnknownEvent,
)
from taskbus.contracts.inbound import Refused, inbound_event
from taskbus.contracts.observability import trace_headers

# Kinds a runner acts on; everything else in the log is not its business.
RUNNER_EVENTS: tuple[type[Event], ...] = (
    RuntimeRequested,
    RuntimeControlRequested,
    ConversationDeleted,
    CmdRunAction,
    FileReadAction,
    FileWriteAction,
    FileEditAction,
    MCPAction,
)
# The forwarded event's sequence in the events stream.
EVENT_SEQUENCE_HEADER = "Taskbus-Event-Sequence"


async def forward(js: JetStreamContext, runner_id: str, event: Event, message: Msg) -> None:
    """Put `event`, consumed from the log as `message`, on its runner's work subject, byte for
    byte; idempotent (see the module docstring)."""
    await js.publish(
        subjects.runner_work_subject(runner_id, message.subject),
        message.data,
        stream=subjects.RUNNER_WORK_STREAM,
        headers=trace_headers(
            {
                "Nats-Msg-Id": f"{event.conversation_id}:{event.id}",
                EVENT_SEQUENCE_HEADER: str(message.metadata.sequence.stream),
            }
        ),
    )


def inbound_work(runner_id: str, message: Msg) -> tuple[AnyEvent | UnknownEvent, int]:
    """The forwarded event and its log sequence, checked as the event itself would be (on its
    own conversation's subject) and addressed to this runner; else `Refused`."""
    if not message.subject.startswith(f"{subjects.RUNNER_WORK_PREFIX}.{runner_id}."):
        raise Refused("not this runner's work subject")
    event = inbound_event(subjects.event_subject_of_work(message.subject), message.data)
    sequence = (message.headers or {}).get(EVENT_SEQUENCE_HEADER, "")
    if not sequence.isdigit():
        raise Refused("work without its event's log sequence")
    return event, int(sequence)
