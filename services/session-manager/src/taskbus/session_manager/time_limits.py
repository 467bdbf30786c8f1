"""The conversation time limits of `ConversationSpec.timeouts`, decided from the state and the
clock. Pure: the service asks every conversation it holds once a second.

- `max_duration_seconds`, counted from the latest start: the conversation is STOPPED with reason
  `timeout` (paused time counts; a stopped conversation can be continued with a message).
- `idle_seconds` without any event:
  - a running conversation whose agent waits for the user is PAUSED with reason `idle`, and its
    sandbox paused; the user's next message or confirmation wakes it;
  - a finished conversation gives its sandbox back (the workspace stays), so sandboxes are not
    held by conversations nobody uses; a later message starts a new one;
  - a failed one is cleaned up: STOPPED with reason `cleanup`, its sandbox given back (the
    seed's Error -> cleanup -> Stopped).
Idle never interrupts work: a running command or an LLM call keeps the conversation busy.
"""

from __future__ import annotations

from datetime import datetime, timedelta

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


def time_limit_events(state: ConversationState, now: datetime) -> list[Event]:
    """The events a time limit calls for at `now`; none while every limit holds."""
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
    if (
        timeouts.idle_seconds is None
        or state.last_activity is None
        or now - state.last_activity < timedelta(seconds=timeouts.idle_seconds)
    ):
        return []
    if state.status == _S.RUNNING and state.agent_state in _WAITING_FOR_USER:
        return pause_events(state, IDLE_REASON)
    if awaits_cleanup(state):
        return stop_events(state, CLEANUP_REASON)
    if state.status == _S.FINISHED and state.runtime_status in LIVE_RUNTIME_STATUSES:
        # The request is an event too, so a runner that never answers is asked again only
        # after another idle period.
        return [runtime_control_event(state, RuntimeControl.STOP, IDLE_REASON)]
    return []
