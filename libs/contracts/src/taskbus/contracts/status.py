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
    # FINISHED is never rewritten as STOPPED: the record of success stays.
    _S.FINISHED: frozenset({_S.QUEUED, _S.STARTING, _S.RUNNING, _S.ARCHIVED}),
    _S.ERROR: frozenset({_S.QUEUED, _S.STARTING, _S.RUNNING, _S.STOPPED, _S.ARCHIVED}),
    _S.ARCHIVED: frozenset(),
}

# The status sets, named once (every service and test uses these, never its own spelling):
# - active: the conversation holds (or is about to hold) a sandbox;
# - ended: a run's outcome; a new user message may still continue the conversation;
# - settled: nothing happens until a user acts (ended, or deleted): frees its admission slot.
ACTIVE_STATUSES = frozenset({_S.STARTING, _S.RUNNING, _S.PAUSED})
ENDED_STATUSES = frozenset({_S.FINISHED, _S.ERROR, _S.STOPPED})
SETTLED_STATUSES = ENDED_STATUSES | {_S.ARCHIVED}
# Runtime statuses of a sandbox that exists (an ended conversation may still hold one).
LIVE_RUNTIME_STATUSES = frozenset(
    {RuntimeStatus.STARTING, RuntimeStatus.READY, RuntimeStatus.PAUSED}
)

# The first status a new conversation gets (admission starts it or makes it wait).
INITIAL_STATUSES = frozenset({_S.QUEUED, _S.STARTING})


class Control(enum.StrEnum):
    """A user's command on one conversation, as `COMMAND_TRANSITIONS` names it."""

    START = "start"
    STOP = "stop"
    PAUSE = "pause"
    RESUME = "resume"
    MESSAGE = "message"
    CONFIRM = "confirm"  # confirm or reject the action awaiting the user's approval
    DELETE = "delete"
    RENAME = "rename"


_NOT_DELETED = frozenset(ConversationStatus) - {_S.ARCHIVED}

# The statuses from which session-manager accepts each user command, and the status the command
# moves the conversation to (the same status: the command changes none itself; what follows,
# such as a message waking an ended conversation, is `decide`'s). A status missing from a row
# refuses the command (HTTP 409) and nothing is appended. Every move is in TRANSITIONS. START may
# end in QUEUED instead (admission); CONFIRM also needs an action awaiting the user's answer.
COMMAND_TRANSITIONS: dict[Control, dict[ConversationStatus, ConversationStatus]] = {
    Control.START: {_S.STOPPED: _S.STARTING},
    Control.STOP: {
        s: _S.STOPPED for s in (_S.QUEUED, _S.STARTING, _S.RUNNING, _S.PAUSED, _S.ERROR)
    },
    Control.PAUSE: {_S.STARTING: _S.PAUSED, _S.RUNNING: _S.PAUSED},
    Control.RESUME: {_S.PAUSED: _S.RUNNING},
    Control.MESSAGE: {s: s for s in _NOT_DELETED},
    Control.CONFIRM: {_S.RUNNING: _S.RUNNING, _S.PAUSED: _S.PAUSED},
    Control.DELETE: {s: _S.ARCHIVED for s in _NOT_DELETED},
    Control.RENAME: {s: s for s in _NOT_DELETED},
}


def command_target(control: Control, current: ConversationStatus) -> ConversationStatus | None:
    """The status `control` moves a `current` conversation to; None if it is refused."""
    return COMMAND_TRANSITIONS[control].get(current)


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
