"""The one conversation summary fold: event by event (event-store) and from the latest event of
each kind (gateway) give the same summary."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from taskbus.contracts.events import (
    AgentStateChanged,
    AnyEvent,
    ConversationCreated,
    ConversationDeleted,
    ConversationRenamed,
    ConversationStatusChanged,
    Event,
    EventSource,
    LLMMetrics,
    MessageAction,
    ResourceUsage,
    ThinkAction,
    UnknownEvent,
    decode_event,
    encode_event,
)
from taskbus.contracts.queries import ConversationInfo, ResourceUsageInfo
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import AgentState, ConversationStatus
from taskbus.contracts.summary import SHAPING, summarize, summary_of_latest

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
CID = "conv-1"
ENV = EventSource.ENVIRONMENT


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def created() -> ConversationCreated:
    return ConversationCreated(
        conversation_id=CID,
        source=EventSource.USER,
        id=0,
        timestamp=T0,
        user_id="alice",
        title="Fix the tests",
        spec=ConversationSpec(repository="octo/repo", selected_branch="main", priority=5),
    )


def status(event_id: int, value: ConversationStatus, reason: str = "") -> ConversationStatusChanged:
    return ConversationStatusChanged(
        conversation_id=CID,
        source=ENV,
        id=event_id,
        timestamp=at(event_id),
        status=value,
        reason=reason,
    )


def metrics(event_id: int, cost: float, total: float) -> LLMMetrics:
    return LLMMetrics(
        conversation_id=CID,
        source=ENV,
        id=event_id,
        timestamp=at(event_id),
        model="m",
        cost=cost,
        accumulated_cost=total,
    )


def renamed(event_id: int, title: str) -> ConversationRenamed:
    return ConversationRenamed(
        conversation_id=CID,
        source=EventSource.USER,
        id=event_id,
        timestamp=at(event_id),
        title=title,
    )


def usage(event_id: int, memory_peak_bytes: int) -> ResourceUsage:
    return ResourceUsage(
        conversation_id=CID,
        source=ENV,
        id=event_id,
        timestamp=at(event_id),
        cpu_seconds=1.5,
        memory_bytes=1024,
        memory_peak_bytes=memory_peak_bytes,
        pids=4,
        disk_bytes=4096,
        measured_by="cgroup",
    )


def fold(*events: AnyEvent | UnknownEvent) -> ConversationInfo | None:
    info: ConversationInfo | None = None
    for event in events:
        info = summarize(info, event)
    return info


def test_conversation_created_starts_a_queued_conversation_from_its_spec() -> None:
    info = summarize(None, created())
    assert info is not None
    assert (info.conversation_id, info.user_id, info.title) == (CID, "alice", "Fix the tests")
    assert (info.status, info.agent_state, info.status_reason) == (
        ConversationStatus.QUEUED,
        None,
        "",
    )
    assert (info.repository, info.selected_branch, info.priority) == ("octo/repo", "main", 5)
    assert (info.created_at, info.updated_at, info.accumulated_cost) == (T0, T0, 0.0)
    assert (info.event_count, info.last_event_id) == (1, 0)


def test_events_before_creation_summarize_nothing() -> None:
    message = MessageAction(conversation_id=CID, source=EventSource.USER, id=0, content="hi")
    assert summarize(None, message) is None


def test_status_agent_state_and_cost_follow_the_log() -> None:
    info = fold(
        created(),
        status(1, ConversationStatus.RUNNING),
        AgentStateChanged(
            conversation_id=CID, source=ENV, id=2, timestamp=at(2), agent_state=AgentState.RUNNING
        ),
        metrics(3, 0.25, 0.25),
        metrics(4, 0.5, 0.75),
        status(5, ConversationStatus.ERROR, "budget exceeded"),
    )
    assert info is not None
    assert (info.status, info.status_reason) == (ConversationStatus.ERROR, "budget exceeded")
    assert info.agent_state is AgentState.RUNNING
    # The producer's running total, which session-manager checks the budget against.
    assert info.accumulated_cost == 0.75
    assert (info.event_count, info.last_event_id) == (6, 5)
    assert (info.created_at, info.updated_at) == (T0, at(5))


def test_a_deleted_conversation_is_archived_for_good() -> None:
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
    late = summarize(deleted, status(3, ConversationStatus.STOPPED))
    assert late is not None
    assert (late.status, late.status_reason) == (ConversationStatus.ARCHIVED, "deleted")
    assert (late.event_count, late.last_event_id, late.updated_at) == (4, 3, at(3))


def test_the_latest_rename_gives_the_title() -> None:
    info = fold(
        created(), renamed(1, "First"), status(2, ConversationStatus.RUNNING), renamed(3, "Second")
    )
    assert info is not None
    assert (info.title, info.status, info.updated_at) == (
        "Second",
        ConversationStatus.RUNNING,
        at(3),
    )
    latest = [renamed(1, "First")] + [None] * (len(SHAPING) - 1)
    assert summary_of_latest(created(), latest, 1, at(1)).title == "First"


def test_the_latest_resource_usage_is_kept_after_the_sandbox_is_gone() -> None:
    fresh = fold(created())
    assert fresh is not None and fresh.resource_usage is None
    info = fold(
        created(),
        usage(1, memory_peak_bytes=100),
        usage(2, memory_peak_bytes=300),
        status(3, ConversationStatus.FINISHED),
    )
    assert info is not None
    assert info.resource_usage == ResourceUsageInfo(
        cpu_seconds=1.5,
        memory_bytes=1024,
        memory_peak_bytes=300,
        pids=4,
        disk_bytes=4096,
        measured_by="cgroup",
        measured_at=at(2),
        event_id=2,
    )


def test_a_redelivered_event_changes_nothing() -> None:
    once = fold(created(), metrics(1, 1.0, 1.0))
    assert once is not None
    assert summarize(once, metrics(1, 1.0, 1.0)) is once
    assert summarize(once, created()) is once
    assert once.accumulated_cost == 1 and once.event_count == 2


def test_events_of_unknown_kinds_count_and_touch_updated_at() -> None:
    class FutureEvent(ThinkAction):
        pass

    unknown = decode_event(
        encode_event(
            FutureEvent(conversation_id=CID, source=ENV, id=1, timestamp=at(9), thought="x")
        )
    )
    assert isinstance(unknown, UnknownEvent)
    info = fold(created(), unknown)
    assert info is not None
    assert (info.event_count, info.last_event_id, info.updated_at) == (2, 1, at(9))


_NOT_ARCHIVED = [s for s in ConversationStatus if s is not ConversationStatus.ARCHIVED]


def _random_log(rng: random.Random) -> list[Event]:
    """A conversation's log: creation, then a random mix of every kind that shapes the summary
    and of kinds that do not, with a running cost total as session-manager writes it."""
    events: list[Event] = [created()]
    total = 0.0
    length = rng.randint(1, 40)
    while len(events) < length:
        event_id = len(events)
        choice = rng.randrange(7)
        if choice == 0:
            events.append(status(event_id, rng.choice(_NOT_ARCHIVED), f"r{event_id}"))
        elif choice == 1:
            events.append(
                AgentStateChanged(
                    conversation_id=CID,
                    source=ENV,
                    id=event_id,
                    timestamp=at(event_id),
                    agent_state=rng.choice(list(AgentState)),
                )
            )
        elif choice == 2:
            cost = rng.choice([0.0, 0.001, 0.1, 0.3])
            total += cost
            events.append(metrics(event_id, cost, total))
        elif choice == 3 and rng.random() < 0.2:
            # As session-manager deletes: the deletion, then the status ARCHIVED with it.
            events.append(
                ConversationDeleted(
                    conversation_id=CID,
                    source=EventSource.USER,
                    id=event_id,
                    timestamp=at(event_id),
                )
            )
            events.append(status(event_id + 1, ConversationStatus.ARCHIVED, "deleted"))
        elif choice == 4:
            events.append(renamed(event_id, f"title {event_id}"))
        elif choice == 5:
            events.append(usage(event_id, memory_peak_bytes=rng.randrange(1 << 30)))
        else:
            events.append(
                MessageAction(
                    conversation_id=CID,
                    source=EventSource.USER,
                    id=event_id,
                    timestamp=at(event_id),
                    content="more",
                )
            )
    return events


@pytest.mark.parametrize("seed", range(200))
def test_folding_every_event_equals_folding_the_latest_of_each_kind(seed: int) -> None:
    """What the event-store folds from the whole log and what the gateway folds from direct
    gets of the latest events are one summary."""
    log = _random_log(random.Random(seed))
    everything = fold(*log)  # type: ignore[arg-type]
    latest = [next((e for e in reversed(log) if type(e) is kind), None) for kind in SHAPING]
    first = log[0]
    assert isinstance(first, ConversationCreated)
    assert everything == summary_of_latest(first, latest, log[-1].id, log[-1].timestamp)


def test_the_latest_summary_takes_the_log_tail_for_its_counters() -> None:
    info = summary_of_latest(created(), [None, None, metrics(3, 0.5, 1.5), None], 7, at(9))
    assert (info.event_count, info.last_event_id, info.updated_at) == (8, 7, at(9))
    assert (info.status, info.accumulated_cost) == (ConversationStatus.QUEUED, 1.5)
