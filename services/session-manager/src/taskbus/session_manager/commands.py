"""The verdict on a user's command: accepted with the events it appends, or refused with why.

Pure, and decided by the contracts' one table (`status.COMMAND_TRANSITIONS`): a command is
accepted only from the statuses its row names, so `pause` on a stopped conversation or `stop`
on a finished one is refused and nothing is appended. A message while an action awaits the
user's answer also rejects that action, with the message as the reason, so the agent goes on
with the message in view rather than waiting for an answer that will not come.
"""

from __future__ import annotations

import msgspec

from taskbus.contracts.commands import (
    NOT_FOUND,
    CommandVerdict,
    ConfirmAction,
    ConversationCommand,
    DeleteConversation,
    PauseConversation,
    RenameConversation,
    ResumeConversation,
    SendMessage,
    StartConversation,
    StopConversation,
)
from taskbus.contracts.events import ConversationRenamed, Event, EventSource, MessageAction
from taskbus.contracts.status import Control, ConversationStatus, command_target
from taskbus.session_manager.lifecycle import (
    confirmation_events,
    delete_events,
    pause_events,
    resume_events,
    stop_events,
)
from taskbus.session_manager.state import ConversationState

INVALID_TRANSITION = "invalid_transition"
NOTHING_TO_CONFIRM = "nothing_to_confirm"


class Accept(msgspec.Struct, frozen=True, kw_only=True):
    """Append `events`; `admit`: the conversation goes through admission (start)."""

    events: tuple[Event, ...] = ()
    admit: bool = False


class Refuse(msgspec.Struct, frozen=True, kw_only=True):
    reason: str
    detail: str


_CONTROLS: dict[type[ConversationCommand], Control] = {
    StartConversation: Control.START,
    StopConversation: Control.STOP,
    PauseConversation: Control.PAUSE,
    ResumeConversation: Control.RESUME,
    SendMessage: Control.MESSAGE,
    ConfirmAction: Control.CONFIRM,
    DeleteConversation: Control.DELETE,
    RenameConversation: Control.RENAME,
}


def control_of(command: ConversationCommand) -> Control:
    return _CONTROLS[type(command)]


def verdict(state: ConversationState, command: ConversationCommand) -> Accept | Refuse:
    """Whether `command` applies to the conversation `state` folds, and what it appends."""
    cid = command.conversation_id
    # Deleted means gone: a command on a deleted conversation is a 404, as every read of it.
    if not state.created or state.user_id != command.user_id or state.deleted:
        return Refuse(reason=NOT_FOUND, detail=f"conversation {cid!r} not found")
    # Created but not yet given a status: admission was interrupted and will decide.
    status = state.status or ConversationStatus.QUEUED
    control = control_of(command)
    if command_target(control, status) is None:
        return Refuse(
            reason=INVALID_TRANSITION,
            detail=f"cannot {control} a conversation that is {status}",
        )
    events: list[Event]
    match command:
        case StartConversation():
            return Accept(admit=True)
        case SendMessage():
            message = MessageAction(
                conversation_id=cid, source=EventSource.USER, content=command.content
            )
            events = [*confirmation_events(state, False, reason=command.content), message]
        case StopConversation():
            events = stop_events(state, command.reason)
        case PauseConversation():
            events = pause_events(state)
        case ResumeConversation():
            events = resume_events(state)
        case DeleteConversation():
            events = delete_events(state)
        case RenameConversation():
            events = [
                ConversationRenamed(
                    conversation_id=cid, source=EventSource.USER, title=command.title
                )
            ]
        case ConfirmAction():
            events = confirmation_events(state, command.confirmed)
            if not events:
                return Refuse(
                    reason=NOTHING_TO_CONFIRM, detail="no action is awaiting confirmation"
                )
    if not events:  # the table allows it, but the lifecycle has nothing to do: say so
        return Refuse(
            reason=INVALID_TRANSITION, detail=f"cannot {control} a conversation that is {status}"
        )
    return Accept(events=tuple(events))


def may_have_a_verdict(command: ConversationCommand, redelivered: bool) -> bool:
    """Whether a verdict on this command's id may exist already: a keyed id comes again with a
    retry (past JetStream's dedupe window), and any command comes again after a crash between
    its verdict and its ack. A first delivery of a `fresh_id` cannot have one, so the hot path
    (a message) costs no lookup."""
    return command.command_id is not None and (redelivered or not command.fresh_id)


def command_verdict(
    command: ConversationCommand, state: ConversationState, decision: Accept | Refuse
) -> CommandVerdict | None:
    """What the asker is told, from the state after an accepted command's events (or the
    state that refused it); None when the command names no `command_id` (nobody waits)."""
    if command.command_id is None:
        return None
    if isinstance(decision, Accept):
        return CommandVerdict(
            command_id=command.command_id,
            conversation_id=command.conversation_id,
            accepted=True,
            status=state.status,
            last_event_id=state.last_event_id,
        )
    found = decision.reason != NOT_FOUND  # nothing is told of another user's conversation
    return CommandVerdict(
        command_id=command.command_id,
        conversation_id=command.conversation_id,
        accepted=False,
        status=state.status if found else None,
        reason=decision.reason,
        detail=decision.detail,
        last_event_id=state.last_event_id if found else -1,
    )
