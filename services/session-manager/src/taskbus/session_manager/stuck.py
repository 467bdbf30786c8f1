"""Stuck detection: the agent repeating the same action and getting the same result. Pure.

Only what happened since the user last spoke counts, so a user message (the way to continue after
the error) gives the agent a fresh start.
"""

from __future__ import annotations

from taskbus.contracts.events import ErrorObservation, Event, EventSource
from taskbus.contracts.status import AgentState, ConversationStatus
from taskbus.session_manager.decide import agent_state_event, status_event
from taskbus.session_manager.history import observation_text
from taskbus.session_manager.state import OBSERVATIONS, ConversationState
from taskbus.session_manager.tools import tool_call_of

STUCK = "stuck"

# An action as a comparable value: its tool call (name, JSON arguments) and the result text.
_Step = tuple[str, str, str | None]


def _steps_since_user_spoke(state: ConversationState) -> list[_Step]:
    recent = [e for e in state.history if e.id > state.last_user_message_id]
    results = {e.cause: observation_text(e) for e in recent if isinstance(e, OBSERVATIONS)}
    steps: list[_Step] = []
    for event in recent:
        call = tool_call_of(event)
        if call is not None:
            name, arguments = call
            steps.append((name, repr(sorted(arguments.items())), results.get(event.id)))
    return steps


def is_stuck(state: ConversationState, repetitions: int) -> bool:
    """Whether the last `repetitions` actions were the same call with the same result."""
    steps = _steps_since_user_spoke(state)
    return len(steps) >= repetitions and len(set(steps[-repetitions:])) == 1


def stuck_events(state: ConversationState, repetitions: int) -> list[Event]:
    return [
        ErrorObservation(
            conversation_id=state.conversation_id,
            source=EventSource.ENVIRONMENT,
            content=(
                f"The agent repeated the same action with the same result {repetitions} times "
                "and was stopped. Send a message to continue."
            ),
            code=STUCK,
        ),
        agent_state_event(state, AgentState.ERROR, STUCK),
        status_event(state, ConversationStatus.ERROR, STUCK),
    ]
