"""The conversation cache: folds from the real log on a miss, applies in order, refolds after a
gap, reports each change once, and forgets only what nobody uses."""

from __future__ import annotations

import uuid

import pytest
from nats.js import JetStreamContext

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.status import ConversationStatus
from taskbus.session_manager import log, snapshots
from taskbus.session_manager.conversations import Conversations
from taskbus.session_manager.state import ConversationState, fold

from .test_recovery import created, message, status

S = ConversationStatus


def cache(bus: JetStreamContext) -> tuple[Conversations, list[ConversationState]]:
    changes: list[ConversationState] = []
    return Conversations(bus, changes.append), changes


async def test_a_miss_folds_the_log_and_appends_are_applied_in_order(
    bus: JetStreamContext,
) -> None:
    cid = f"cache-{uuid.uuid4().hex[:8]}"
    appender = EventAppender(bus)
    await appender.append_all([created(cid), status(cid, S.QUEUED)])
    conversations, changes = cache(bus)

    loaded = await conversations.load(cid)
    assert loaded == fold(cid, await log.read_conversation(bus, cid))
    assert loaded.status == S.QUEUED and changes == [loaded]
    assert await conversations.load(cid) is loaded  # a hit reads no log and reports nothing

    appended = await appender.append_all([status(cid, S.STARTING), status(cid, S.RUNNING)])
    await conversations.include(appended)
    assert conversations[cid].last_event_id == appended[-1].id
    assert conversations[cid].status == S.RUNNING
    assert len(changes) == 2
    for event in appended:  # the consumer delivers them again: already in, nothing changes
        await conversations.observe(event)
    assert len(changes) == 2
    assert conversations[cid] == fold(cid, await log.read_conversation(bus, cid))


async def test_a_new_conversations_first_append_is_folded_without_reading_the_log(
    bus: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = f"cache-{uuid.uuid4().hex[:8]}"
    appended = await EventAppender(bus).append_all([created(cid), status(cid, S.QUEUED)])
    conversations, changes = cache(bus)

    async def no_read(*args: object) -> None:
        raise AssertionError("the log was read back")

    with monkeypatch.context() as patched:
        patched.setattr(snapshots, "load", no_read)
        await conversations.include(appended)
    assert conversations[cid] == fold(cid, await log.read_conversation(bus, cid))
    assert conversations[cid].status == S.QUEUED and changes == [conversations[cid]]


async def test_a_gap_refolds_from_the_log(bus: JetStreamContext) -> None:
    cid = f"cache-{uuid.uuid4().hex[:8]}"
    appender = EventAppender(bus)
    first = await appender.append_all([created(cid)])
    conversations, _ = cache(bus)
    await conversations.observe(first[0])
    missed = await appender.append_all([status(cid, S.STARTING), status(cid, S.RUNNING)])
    later = await appender.append_all([message(cid)])

    await conversations.observe(later[0])  # the events in `missed` never arrived

    assert conversations[cid].last_event_id == later[0].id
    assert conversations[cid].status == S.RUNNING
    assert conversations[cid] == fold(cid, [*first, *missed, *later])


async def test_forget_keeps_a_state_in_use_and_refolds_a_forgotten_one(
    bus: JetStreamContext,
) -> None:
    cid = f"cache-{uuid.uuid4().hex[:8]}"
    await EventAppender(bus).append_all([created(cid), status(cid, S.QUEUED)])
    conversations, _ = cache(bus)
    state = await conversations.load(cid)

    assert not conversations.forget(cid, in_use=True)
    assert conversations.states[cid] is state
    assert conversations.forget(cid, in_use=False)
    assert cid not in conversations.states
    assert await conversations.load(cid) == state
