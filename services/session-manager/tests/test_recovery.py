"""Which conversations a (re)starting session-manager picks up from the log."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    ConversationCreated,
    ConversationStatusChanged,
    Event,
    EventSource,
    MessageAction,
    RuntimeStatusChanged,
    encode_event,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus, RuntimeStatus
from taskbus.session_manager.log import conversations_to_recover

S = ConversationStatus


def created(cid: str) -> ConversationCreated:
    return ConversationCreated(
        conversation_id=cid,
        source=EventSource.USER,
        user_id="u",
        title="t",
        spec=ConversationSpec(),
    )


def status(cid: str, value: ConversationStatus) -> ConversationStatusChanged:
    return ConversationStatusChanged(
        conversation_id=cid, source=EventSource.ENVIRONMENT, status=value
    )


def runtime(cid: str, value: RuntimeStatus) -> RuntimeStatusChanged:
    return RuntimeStatusChanged(conversation_id=cid, source=EventSource.ENVIRONMENT, status=value)


def message(cid: str) -> MessageAction:
    return MessageAction(conversation_id=cid, source=EventSource.USER, content="more, please")


async def test_recovers_what_may_need_work_and_nothing_settled(bus: JetStreamContext) -> None:
    histories: dict[str, list[Event]] = {}

    def history(name: str, *steps: object) -> None:
        cid = f"{name}-{uuid.uuid4().hex[:8]}"
        histories[cid] = [created(cid), *(step(cid) for step in steps)]  # type: ignore[operator]

    def to(value: ConversationStatus) -> object:
        return lambda cid: status(cid, value)

    def sandbox(value: RuntimeStatus) -> object:
        return lambda cid: runtime(cid, value)

    history("admission-interrupted")
    history("queued", to(S.QUEUED))
    history("running", to(S.STARTING), sandbox(RuntimeStatus.READY), to(S.RUNNING))
    history("paused", to(S.STARTING), to(S.RUNNING), to(S.PAUSED))
    history("finished-holding", to(S.STARTING), sandbox(RuntimeStatus.READY), to(S.FINISHED))
    history(
        "finished-released",
        to(S.STARTING),
        sandbox(RuntimeStatus.READY),
        to(S.FINISHED),
        sandbox(RuntimeStatus.STOPPED),
    )
    history("stopped-then-asked", to(S.STARTING), to(S.STOPPED), message)
    history("asked-then-stopped", to(S.STARTING), message, to(S.STOPPED))
    history("archived", to(S.STARTING), to(S.STOPPED), to(S.ARCHIVED))
    appender = EventAppender(bus)
    for events in histories.values():
        await appender.append_all(events)

    recovered = set(await conversations_to_recover(bus)) & set(histories)
    assert {cid.rsplit("-", 1)[0] for cid in recovered} == {
        "admission-interrupted",
        "queued",
        "running",
        "paused",
        "finished-holding",
        "stopped-then-asked",
    }


async def test_recovers_beyond_the_100000_subjects_stream_info_lists(bus: JetStreamContext) -> None:
    """Stream info lists at most 100,000 subjects; recovery must see every conversation."""
    tag = uuid.uuid4().hex[:6]
    count = 100_500
    for start in range(0, count, 5000):
        acks = [
            await bus.publish_async(
                subjects.event_subject(cid, ConversationCreated.__name__),
                encode_event(msgspec.structs.replace(created(cid), id=0)),
            )
            for cid in (f"{tag}{n:07d}" for n in range(start, min(start + 5000, count)))
        ]
        await asyncio.gather(*acks)
    recovered = [cid for cid in await conversations_to_recover(bus) if cid.startswith(tag)]
    assert len(recovered) == len(set(recovered)) == count
