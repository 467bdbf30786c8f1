"""Clock skew (issue 13): idle and duration limits count on session-manager's own monotonic
clock, not on the timestamps other services (on other hosts, with other clocks) put in events.

The pure part feeds folds with timestamps an hour off either way and moves a fake monotonic
clock; the service part has a "runner" whose clock is an hour behind or ahead append to a
conversation waiting for its user, and shows the idle pause comes `idle_seconds` after the
service saw that event, neither at once nor never.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import ConversationStatusChanged, EventSource, RuntimeStatusChanged
from taskbus.contracts.specs import ConversationSpec, Timeouts
from taskbus.contracts.status import AgentState, ConversationStatus, RuntimeStatus
from taskbus.session_manager.time_limits import LocalClock, time_limit_events

from .conftest import FoldEvents
from .test_agent_loop import agent_stack, agent_state_reached, status_reached
from .test_time_limits import limited, question, timed

HOUR = 3600.0
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("skew", [-HOUR, HOUR], ids=["behind", "ahead"])
def test_idle_counts_from_when_this_service_saw_the_activity(
    fold_events: FoldEvents, skew: float
) -> None:
    """The waiting question was stamped by a clock `skew` off this service's `NOW`."""
    state = fold_events(*limited(idle=300), *timed(question(), skew))
    # Read at face value, the timestamps would pause it at once (behind) or never (ahead).
    assert bool(time_limit_events(state, NOW)) == (skew < 0)
    monotonic = FakeMonotonic()
    clock = LocalClock(monotonic)
    clock.saw(state)
    monotonic.now += 299
    assert time_limit_events(clock.local(state, NOW), NOW) == []
    monotonic.now += 1
    paused = time_limit_events(clock.local(state, NOW), NOW)
    assert len(paused) > 1 and getattr(paused[1], "status", None) == ConversationStatus.PAUSED


@pytest.mark.parametrize("skew", [-HOUR, HOUR], ids=["behind", "ahead"])
def test_max_duration_counts_from_when_this_service_saw_the_start(
    fold_events: FoldEvents, skew: float
) -> None:
    """Another instance (before a partition moved here) started it, its clock `skew` off."""
    state = fold_events(*timed(limited(duration=60), skew))
    monotonic = FakeMonotonic()
    clock = LocalClock(monotonic)
    clock.saw(state)
    monotonic.now += 59.5
    # This service's wall clock may jump too: only the monotonic time counts.
    assert time_limit_events(clock.local(state, NOW + timedelta(days=1)), NOW) == []
    monotonic.now += 0.5
    stopped = time_limit_events(clock.local(state, NOW), NOW)
    assert stopped and getattr(stopped[0], "reason", None) == "timeout"


def test_a_new_activity_restarts_the_count_and_a_forgotten_one_starts_afresh(
    fold_events: FoldEvents,
) -> None:
    early = fold_events(*limited(idle=300), *timed(question(), -HOUR))
    later = fold_events(*limited(idle=300), *timed(question(), -HOUR), *timed(question(), -10))
    monotonic = FakeMonotonic()
    clock = LocalClock(monotonic)
    clock.saw(early)
    monotonic.now += 200
    clock.saw(later)  # newer activity: counted from now
    monotonic.now += 200
    assert time_limit_events(clock.local(later, NOW), NOW) == []
    clock.forget(later.conversation_id)
    monotonic.now += 200
    assert time_limit_events(clock.local(later, NOW), NOW) == []  # seen again just now


@pytest.mark.parametrize("skew", [-HOUR, HOUR], ids=["behind", "ahead"])
async def test_a_runner_with_a_skewed_clock_neither_hurries_nor_stops_the_idle_pause(
    tmp_path: Path, skew: float
) -> None:
    idle = 4.0
    script = {"steps": [{"content": "Which file should I change?"}]}
    spec = ConversationSpec(initial_user_msg="Change a file.", timeouts=Timeouts(idle_seconds=idle))
    async with (
        agent_stack(tmp_path, script, time_limit_check_seconds=0.2) as stack,
        stack.conversation("kim", spec) as runtime,
    ):
        await runtime.wait_for(agent_state_reached(AgentState.AWAITING_USER_INPUT))
        # The runner reports its sandbox again, stamped by its own clock.
        report = RuntimeStatusChanged(
            conversation_id=runtime.cid,
            source=EventSource.ENVIRONMENT,
            status=RuntimeStatus.READY,
            timestamp=datetime.now(UTC) + timedelta(seconds=skew),
        )
        appended_at = time.monotonic()
        (stored,) = await EventAppender(stack.js).append_all([report])
        await runtime.wait_for(status_reached(ConversationStatus.PAUSED))
        paused_at = time.monotonic()

    # Idle counts from when the service saw the report, which is after it was appended.
    assert paused_at - appended_at >= idle
    (paused,) = [
        e
        for e in runtime.of(ConversationStatusChanged)
        if getattr(e, "status", None) == ConversationStatus.PAUSED
    ]
    assert paused.id > stored.id and getattr(paused, "reason", None) == "idle"
