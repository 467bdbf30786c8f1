"""Snapshots: a load from a snapshot and the log's tail equals the whole log folded (also across
condensations); a corrupt, outdated, foreign or misplaced snapshot is ignored for a full fold;
and a deletion purges it. (That the history costs O(1) per event: test_state.py.)"""

from __future__ import annotations

import uuid

import msgspec
import pytest
from nats.js import JetStreamContext

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import (
    ActionProposed,
    CmdRunAction,
    CondensationAction,
    ConversationDeleted,
    Event,
    EventSource,
)
from taskbus.contracts.status import ConversationStatus
from taskbus.devtools import agent_log
from taskbus.session_manager import log, snapshots
from taskbus.session_manager.conversations import Conversations
from taskbus.session_manager.snapshots import SnapshotStore, decode_snapshot, encode_snapshot
from taskbus.session_manager.state import ConversationState, fold

EVERY = 100


def agent_events(cid: str, count: int) -> list[Event]:
    return agent_log.agent_events(cid, count, condense_every=150)


async def consume(conversations: Conversations, bus: JetStreamContext, cid: str) -> None:
    """Deliver the conversation's log to `conversations` as the events consumer does."""
    for sequence, event in await log.read_events(bus, cid):
        await conversations.observe(event, sequence)


@pytest.fixture
def store(bus: JetStreamContext) -> SnapshotStore:
    return SnapshotStore(bus)


async def logged(bus: JetStreamContext, count: int) -> tuple[str, list[Event]]:
    cid = f"snap-{uuid.uuid4().hex[:8]}"
    return cid, await EventAppender(bus).append_all(agent_events(cid, count))


def test_a_snapshot_round_trips_every_field() -> None:
    events = agent_events("c1", 398)  # ends with a command waiting for its output
    proposed = ActionProposed(
        conversation_id="c1",
        source=EventSource.AGENT,
        id=398,
        proposed=CmdRunAction(conversation_id="c1", source=EventSource.AGENT, command="rm -rf x"),
    )
    state = fold("c1", [*events, proposed])
    assert state.open_action is not None and state.pending_action is not None
    assert any(isinstance(e, CondensationAction) for e in state.history)
    decoded = decode_snapshot(encode_snapshot(state, 1234))
    assert decoded == (state, 1234)
    assert type(decoded[0].open_action) is type(state.open_action)  # not the base Event


async def test_a_load_from_snapshot_and_tail_equals_the_full_fold(
    bus: JetStreamContext, store: SnapshotStore
) -> None:
    cid, events = await logged(bus, 640)
    live = Conversations(bus, lambda _: None, snapshot_every=EVERY, snapshots=store)
    await consume(live, bus, cid)
    assert live[cid] == fold(cid, events)
    found = await store.get(cid)
    assert found is not None and 500 <= found[0].last_event_id < 640
    assert found[0] == fold(cid, events[: found[0].last_event_id + 1])

    loaded = await snapshots.load(bus, store, cid)
    assert loaded.snapshot_id == found[0].last_event_id
    assert loaded.read == 640 - loaded.snapshot_id  # the snapshot's own event, then the tail
    assert loaded.state == fold(cid, await log.read_conversation(bus, cid))

    # A condensation and more events after the snapshot: still the same as folding it all.
    more = await EventAppender(bus).append_all(agent_events(cid, 900)[640:])
    assert any(isinstance(e, CondensationAction) for e in more)
    fresh = Conversations(bus, lambda _: None, snapshot_every=EVERY, snapshots=store)
    assert await fresh.load(cid) == fold(cid, [*events, *more])


async def test_a_log_longer_than_a_read_page_is_read_whole_in_order(
    bus: JetStreamContext, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log, "_READ_PAGE", 7)
    cid, events = await logged(bus, 30)
    read = await log.read_events(bus, cid)
    assert [event for _, event in read] == events
    sequences = [sequence for sequence, _ in read]
    assert sequences == sorted(set(sequences))
    assert await log.read_events(bus, cid, sequences[12]) == read[12:]
    loaded = await snapshots.load(bus, store, cid)
    assert loaded.read == 30 and loaded.sequence == sequences[-1]
    assert loaded.state == fold(cid, events)


async def test_a_long_load_writes_a_snapshot_for_the_next(
    bus: JetStreamContext, store: SnapshotStore
) -> None:
    cid, events = await logged(bus, 250)  # appended, never consumed: no snapshot yet
    assert await store.get(cid) is None
    first = Conversations(bus, lambda _: None, snapshot_every=EVERY, snapshots=store)
    await first.load(cid)
    again = await snapshots.load(bus, store, cid)
    assert again.snapshot_id == 249 and again.read == 1
    assert again.state == fold(cid, events)


async def _bad_snapshot_is_ignored(
    bus: JetStreamContext, store: SnapshotStore, value: bytes
) -> None:
    cid, events = await logged(bus, 300)
    await (await bus.key_value(subjects.SNAPSHOTS_BUCKET)).put(cid, value)
    loaded = await snapshots.load(bus, store, cid)
    assert loaded.snapshot_id == -1 and loaded.read == 300
    assert loaded.state == fold(cid, events)


async def test_an_undecodable_snapshot_is_ignored(
    bus: JetStreamContext, store: SnapshotStore
) -> None:
    await _bad_snapshot_is_ignored(bus, store, b"\x92garbage")
    await _bad_snapshot_is_ignored(bus, store, b"")


async def test_a_snapshot_of_another_format_is_ignored(
    bus: JetStreamContext, store: SnapshotStore
) -> None:
    state = fold("x", agent_events("x", 10))
    good = msgspec.msgpack.decode(encode_snapshot(state, 5))
    await _bad_snapshot_is_ignored(bus, store, msgspec.msgpack.encode({**good, "format": "0.old"}))


async def test_a_snapshot_that_does_not_match_the_log_is_ignored(
    bus: JetStreamContext, store: SnapshotStore
) -> None:
    cid, events = await logged(bus, 300)
    other, _ = await logged(bus, 300)
    sequences = [s for s, _ in await log.read_events(bus, cid)]
    kv = await bus.key_value(subjects.SNAPSHOTS_BUCKET)
    forged = msgspec.structs.replace(fold(cid, events[:200]), status=ConversationStatus.FINISHED)
    misplaced = [
        encode_snapshot(forged, sequences[150]),  # the log holds event 150 there, not 199
        encode_snapshot(fold(cid, events[:200]), sequences[-1] + 10_000),  # ahead of the log
        encode_snapshot(fold(other, events[:200]), sequences[199]),  # another conversation's
    ]
    for value in misplaced:
        await kv.put(cid, value)
        loaded = await snapshots.load(bus, store, cid)
        assert loaded.snapshot_id == -1
        assert loaded.state == fold(cid, events)


async def test_a_deletion_purges_the_snapshot(bus: JetStreamContext, store: SnapshotStore) -> None:
    cid, _ = await logged(bus, 200)
    live = Conversations(bus, lambda _: None, snapshot_every=EVERY, snapshots=store)
    await consume(live, bus, cid)
    assert await store.get(cid) is not None
    await EventAppender(bus).append_all(
        [ConversationDeleted(conversation_id=cid, source=EventSource.USER)]
    )
    await consume(live, bus, cid)
    assert await store.get(cid) is None
    kv = await bus.key_value(subjects.SNAPSHOTS_BUCKET)
    assert [e for e in await kv.history(cid) if e.value] == []  # no revision keeps the state


def test_an_empty_state_round_trips() -> None:
    state = ConversationState(conversation_id="c1")
    assert decode_snapshot(encode_snapshot(state, 1)) == (state, 1)
