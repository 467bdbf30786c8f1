"""Conversation status and agent state, with the one table of allowed status transitions."""

from __future__ import annotations

import enum


class ConversationStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    STOPPED = "STOPPED"
    FINISHED = "FINISHED"
    ERROR = "ERROR"
    ARCHIVED = "ARCHIVED"


class AgentState(enum.StrEnum):
    """The agent's own state, spelled as OpenHands spells it so its clients understand it."""

    LOADING = "loading"
    RUNNING = "running"
    AWAITING_USER_INPUT = "awaiting_user_input"
    PAUSED = "paused"
    STOPPED = "stopped"
    FINISHED = "finished"
    REJECTED = "rejected"
    ERROR = "error"
    AWAITING_USER_CONFIRMATION = "awaiting_user_confirmation"
    USER_CONFIRMED = "user_confirmed"
    USER_REJECTED = "user_rejected"
    RATE_LIMITED = "rate_limited"


class RuntimeStatus(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"


_S = ConversationStatus

# Which status may follow which. FINISHED and ERROR are not terminal: a new user message
# continues the conversation (OpenHands resumes an agent after finish or a limit error).
TRANSITIONS: dict[ConversationStatus, frozenset[ConversationStatus]] = {
    _S.QUEUED: frozenset({_S.STARTING, _S.STOPPED, _S.ERROR, _S.ARCHIVED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.PAUSED, _S.STOPPED, _S.ERROR, _S.ARCHIVED}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.STOPPED, _S.FINISHED, _S.ERROR, _S.ARCHIVED}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.STOPPED, _S.ERROR, _S.ARCHIVED}),
    _S.STOPPED: frozenset({_S.QUEUED, _S.STARTING, _S.ARCHIVED}),
    _S.FINISHED: frozenset({_S.QUEUED, _S.STARTING, _S.RUNNING, _S.STOPPED, _S.ARCHIVED}),
    _S.ERROR: frozenset({_S.QUEUED, _S.STARTING, _S.RUNNING, _S.STOPPED, _S.ARCHIVED}),
    _S.ARCHIVED: frozenset(),
}

# Statuses in which a conversation holds (or is about to hold) a sandbox.
ACTIVE_STATUSES = frozenset({_S.STARTING, _S.RUNNING, _S.PAUSED})
# Runtime statuses of a sandbox that exists (an ended conversation may still hold one).
LIVE_RUNTIME_STATUSES = frozenset(
    {RuntimeStatus.STARTING, RuntimeStatus.READY, RuntimeStatus.PAUSED}
)


class InvalidTransition(ValueError):
    def __init__(self, current: ConversationStatus, target: ConversationStatus) -> None:
        super().__init__(f"conversation cannot go from {current} to {target}")
        self.current = current
        self.target = target


def can_transition(current: ConversationStatus, target: ConversationStatus) -> bool:
    return target in TRANSITIONS[current]


def check_transition(current: ConversationStatus, target: ConversationStatus) -> None:
    if not can_transition(current, target):
        raise InvalidTransition(current, target)
