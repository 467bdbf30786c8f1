"""The status projection fold, without any broker or database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from taskbus.contracts.events import (
    AgentStateChanged,
    ConversationCreated,
    ConversationDeleted,
    ConversationStatusChanged,
    EventSource,
    LLMMetrics,
    MessageAction,
    ThinkAction,
    decode_event,
    encode_event,
)
from taskbus.contracts.queries import ConversationInfo
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import AgentState, ConversationStatus
from taskbus.event_store.projection import apply, in_log_order, is_newer

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
CID = "conv-1"
ENV = EventSource.ENVIRONMENT


def created(event_id: int = 0) -> ConversationCreated:
    return ConversationCreated(
        conversation_id=CID,
        source=EventSource.USER,
        id=event_id,
        timestamp=T0,
        user_id="alice",
        title="Fix the tests",
        spec=ConversationSpec(repository="octo/repo", selected_branch="main", priority=5),
    )


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fold(*events: object) -> ConversationInfo | None:
    info: ConversationInfo | None = None
    for event in events:
        info = apply(info, event)  # type: ignore[arg-type]
    return info


def test_conversation_created_starts_a_queued_conversation_from_its_spec() -> None:
    info = apply(None, created())
    assert info == ConversationInfo(
        conversation_id=CID,
        user_id="alice",
        title="Fix the tests",
        status=ConversationStatus.QUEUED,
        repository="octo/repo",
        selected_branch="main",
        priority=5,
        created_at=T0,
        updated_at=T0,
        event_count=1,
        last_event_id=0,
    )


def test_events_before_creation_project_nothing() -> None:
    message = MessageAction(conversation_id=CID, source=EventSource.USER, id=0, content="hi")
    assert apply(None, message) is None


def test_status_agent_state_and_cost_follow_the_log() -> None:
    info = fold(
        created(),
        ConversationStatusChanged(
            conversation_id=CID,
            source=ENV,
            id=1,
            timestamp=at(1),
            status=ConversationStatus.RUNNING,
        ),
        AgentStateChanged(
            conversation_id=CID, source=ENV, id=2, timestamp=at(2), agent_state=AgentState.RUNNING
        ),
        LLMMetrics(conversation_id=CID, source=ENV, id=3, timestamp=at(3), model="m", cost=0.25),
        LLMMetrics(conversation_id=CID, source=ENV, id=4, timestamp=at(4), model="m", cost=0.5),
        ConversationStatusChanged(
            conversation_id=CID,
            source=ENV,
            id=5,
            timestamp=at(5),
            status=ConversationStatus.ERROR,
            reason="budget exceeded",
        ),
    )
    assert info is not None
    assert info.status is ConversationStatus.ERROR
    assert info.status_reason == "budget exceeded"
    assert info.agent_state is AgentState.RUNNING
    assert info.accumulated_cost == 0.75
    assert (info.event_count, info.last_event_id) == (6, 5)
    assert (info.created_at, info.updated_at) == (T0, at(5))


def test_a_deleted_conversation_is_archived_for_good() -> None:
    def status(event_id: int, value: ConversationStatus) -> ConversationStatusChanged:
        return ConversationStatusChanged(
            conversation_id=CID, source=ENV, id=event_id, timestamp=at(event_id), status=value
        )

    deleted = fold(
        created(),
        status(1, ConversationStatus.RUNNING),
        ConversationDeleted(
            conversation_id=CID, source=EventSource.USER, id=2, timestamp=at(2), reason="deleted"
        ),
    )
    assert deleted is not None
    assert (deleted.status, deleted.status_reason) == (ConversationStatus.ARCHIVED, "deleted")
    # A late status change (the sandbox torn down afterwards) is counted but does not revive it.
    late = apply(deleted, status(3, ConversationStatus.STOPPED))
    assert late is not None
    assert (late.status, late.status_reason) == (ConversationStatus.ARCHIVED, "deleted")
    assert (late.event_count, late.last_event_id, late.updated_at) == (4, 3, at(3))


def test_a_redelivered_event_changes_nothing() -> None:
    metrics = LLMMetrics(conversation_id=CID, source=ENV, id=1, timestamp=at(1), model="m", cost=1)
    once = fold(created(), metrics)
    assert once is not None
    assert apply(once, metrics) is once
    assert apply(once, created()) is once
    assert once.accumulated_cost == 1 and once.event_count == 2


def test_events_of_unknown_kinds_count_and_touch_updated_at() -> None:
    class FutureEvent(ThinkAction):
        pass

    stored = encode_event(
        FutureEvent(conversation_id=CID, source=ENV, id=1, timestamp=at(9), thought="x")
    )
    unknown = decode_event(stored)
    assert type(unknown).__name__ == "UnknownEvent"
    info = fold(created(), unknown)
    assert info is not None
    assert (info.event_count, info.last_event_id, info.updated_at) == (2, 1, at(9))


def test_is_newer_compares_positions_in_the_log() -> None:
    base = apply(None, created())
    assert base is not None
    later = msgspec.structs.replace(base, last_event_id=3)
    assert is_newer(later, base)
    assert not is_newer(base, later)
    assert not is_newer(base, base)


def test_in_log_order_holds_back_events_after_a_gap() -> None:
    def status(event_id: int) -> ConversationStatusChanged:
        return ConversationStatusChanged(
            conversation_id=CID, source=ENV, id=event_id, status=ConversationStatus.RUNNING
        )

    info = fold(created(), status(1), status(2))
    assert info is not None
    assert in_log_order(info, status(3))  # the next one
    assert in_log_order(info, status(1))  # a redelivery: apply ignores it
    assert not in_log_order(info, status(4))  # 3 has not been seen yet
    assert in_log_order(None, created())
    assert not in_log_order(None, status(5))  # the conversation's beginning has not been seen
