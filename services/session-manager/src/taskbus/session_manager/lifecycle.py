"""The events each user command appends, given the conversation's state. Pure."""

from __future__ import annotations

from taskbus.contracts.events import (
    ConfirmationGiven,
    ConversationDeleted,
    Event,
    EventSource,
    RuntimeControl,
)
from taskbus.contracts.status import (
    LIVE_RUNTIME_STATUSES,
    AgentState,
    ConversationStatus,
    can_transition,
)
from taskbus.session_manager.decide import (
    IDLE_REASON,
    agent_state_event,
    runtime_control_event,
    status_event,
)
from taskbus.session_manager.state import ConversationState

_S = ConversationStatus


def _has_sandbox(state: ConversationState) -> bool:
    return state.runtime_status in LIVE_RUNTIME_STATUSES or state.status == _S.STARTING


def stop_events(state: ConversationState, reason: str) -> list[Event]:
    if state.status is None or not can_transition(state.status, _S.STOPPED):
        return []
    events: list[Event] = [
        status_event(state, _S.STOPPED, reason),
        agent_state_event(state, AgentState.STOPPED, reason),
    ]
    if _has_sandbox(state):
        events.append(runtime_control_event(state, RuntimeControl.STOP, reason))
    return events


def pause_events(state: ConversationState, reason: str = "user_pause") -> list[Event]:
    if state.status is None or not can_transition(state.status, _S.PAUSED):
        return []
    return [
        runtime_control_event(state, RuntimeControl.PAUSE, reason),
        status_event(state, _S.PAUSED, reason),
        agent_state_event(state, AgentState.PAUSED),
    ]


def resume_events(state: ConversationState) -> list[Event]:
    if state.status != _S.PAUSED:
        return []
    return [
        runtime_control_event(state, RuntimeControl.RESUME, "user_resume"),
        status_event(state, _S.RUNNING, "user_resume"),
        agent_state_event(state, AgentState.RUNNING),
    ]


def delete_events(state: ConversationState) -> list[Event]:
    if state.status is None or not can_transition(state.status, _S.ARCHIVED):
        return []
    events: list[Event] = []
    if _has_sandbox(state):
        events.append(runtime_control_event(state, RuntimeControl.STOP, "deleted"))
    events += [
        ConversationDeleted(
            conversation_id=state.conversation_id, source=EventSource.USER, reason="deleted"
        ),
        status_event(state, _S.ARCHIVED, "deleted"),
    ]
    return events


def confirmation_events(state: ConversationState, confirmed: bool, reason: str = "") -> list[Event]:
    """The user's answer to the pending confirmation request; nothing if none is pending. A
    conversation paused while it waited for the answer records it and wakes up."""
    pending = state.pending_action
    idle = state.status == _S.PAUSED and state.status_reason == IDLE_REASON
    if (
        pending is None
        or state.confirmation is not None
        or (state.agent_state != AgentState.AWAITING_USER_CONFIRMATION and not idle)
    ):
        return []
    return [
        ConfirmationGiven(
            conversation_id=state.conversation_id,
            source=EventSource.USER,
            cause=pending.id,
            action_id=pending.id,
            confirmed=confirmed,
            reason=reason,
        )
    ]
