"""The conversation time limits of `ConversationSpec.timeouts`, decided from the state and the
clock. Pure: the service asks every conversation it holds once a second.

- `max_duration_seconds`, counted from the latest start: the conversation is STOPPED with reason
  `timeout` (paused time counts; a stopped conversation can be continued with a message).
- `idle_seconds` without any event:
  - a running conversation whose agent waits for the user is PAUSED with reason `idle`, and its
    sandbox paused; the user's next message or confirmation wakes it;
  - a finished conversation gives its sandbox back (the workspace stays), so sandboxes are not
    held by conversations nobody uses; a later message starts a new one (the operator's
    `sandbox_release_seconds`, 60 s, makes finished and failed ones do so sooner);
  - a failed one is cleaned up: STOPPED with reason `cleanup`, its sandbox given back (the
    seed's Error -> cleanup -> Stopped).
Idle never interrupts work: a running command or an LLM call keeps the conversation busy.

The limits count on this service's own monotonic clock (`LocalClock`), never from another
service's timestamps: an event's timestamp is the wall clock of whichever host appended it, and
a runner's clock an hour behind would pause every conversation at once, one ahead would keep
them forever. A conversation's latest activity and start are timed when this service first sees
them, so after a restart a limit counts from the recovery: it may run longer, never shorter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec

from taskbus.contracts.events import Event, RuntimeControl
from taskbus.contracts.status import (
    ACTIVE_STATUSES,
    LIVE_RUNTIME_STATUSES,
    AgentState,
    ConversationStatus,
)
from taskbus.session_manager.decide import IDLE_REASON, awaits_cleanup, runtime_control_event
from taskbus.session_manager.lifecycle import pause_events, stop_events
from taskbus.session_manager.state import ConversationState

TIMEOUT_REASON = "timeout"
CLEANUP_REASON = "cleanup"

_S = ConversationStatus
# Agent states in which a running conversation waits for its user.
_WAITING_FOR_USER = frozenset(
    {
        AgentState.AWAITING_USER_INPUT,
        AgentState.AWAITING_USER_CONFIRMATION,
        AgentState.USER_REJECTED,
    }
)


def time_limit_events(
    state: ConversationState, now: datetime, release_seconds: float | None = None
) -> list[Event]:
    """The events a time limit calls for at `now`; none while every limit holds.

    `release_seconds` is the operator's (`sandbox_release_seconds`): a finished or failed
    conversation gives its sandbox back after that long without events, if its idle limit
    has not made it do so sooner."""
    if state.deleted or state.status is None:
        return []
    timeouts = state.spec.timeouts
    if (
        timeouts.max_duration_seconds is not None
        and state.status in ACTIVE_STATUSES
        and state.started_at is not None
        and now - state.started_at >= timedelta(seconds=timeouts.max_duration_seconds)
    ):
        return stop_events(state, TIMEOUT_REASON)
    if state.last_activity is None:
        return []
    idle = now - state.last_activity
    if timeouts.idle_seconds is not None and idle >= timedelta(seconds=timeouts.idle_seconds):
        if state.status == _S.RUNNING and state.agent_state in _WAITING_FOR_USER:
            return pause_events(state, IDLE_REASON)
        if awaits_cleanup(state):
            return stop_events(state, CLEANUP_REASON)
    held = [s for s in (timeouts.idle_seconds, release_seconds) if s is not None]
    if (
        held
        and idle >= timedelta(seconds=min(held))
        and state.status in (_S.FINISHED, _S.ERROR)
        and state.runtime_status in LIVE_RUNTIME_STATUSES
    ):
        # The request is an event too, so a runner that never answers is asked again only
        # after another such period.
        return [runtime_control_event(state, RuntimeControl.STOP, IDLE_REASON)]
    return []


@dataclass(frozen=True)
class _Seen:
    """A conversation's latest activity and start as its log gives them, and when this service
    first saw each (on its monotonic clock)."""

    activity: datetime | None
    activity_seen: float
    started: datetime | None
    started_seen: float


class LocalClock:
    """Times each conversation's latest activity and start on this service's monotonic clock
    (see the module): `saw` when a state changes, `local` before the limits are decided."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._seen: dict[str, _Seen] = {}

    def saw(self, state: ConversationState) -> _Seen:
        """Note the state's activity and start, timing the ones not seen before."""
        now = self._monotonic()
        before = self._seen.get(state.conversation_id)
        seen = _Seen(
            activity=state.last_activity,
            activity_seen=now
            if before is None or before.activity != state.last_activity
            else before.activity_seen,
            started=state.started_at,
            started_seen=now
            if before is None or before.started != state.started_at
            else before.started_seen,
        )
        self._seen[state.conversation_id] = seen
        return seen

    def local(self, state: ConversationState, now: datetime) -> ConversationState:
        """`state` with its activity and start moved to when this service saw them, expressed
        against `now` (this service's wall clock): what `time_limit_events(..., now)` takes."""
        seen = self.saw(state)
        elapsed = self._monotonic()

        def at(moment: datetime | None, seen_at: float) -> datetime | None:
            return None if moment is None else now - timedelta(seconds=elapsed - seen_at)

        return msgspec.structs.replace(
            state,
            last_activity=at(state.last_activity, seen.activity_seen),
            started_at=at(state.started_at, seen.started_seen),
        )

    def forget(self, conversation_id: str) -> None:
        self._seen.pop(conversation_id, None)
