"""Requests to session-manager (not facts): sent on TASKBUS_COMMANDS by the gateway.

A conversation command that names a `command_id` is answered with a `CommandVerdict`, stored
in KV `taskbus_verdicts` under that id once the command's events are in the log. The asker
watches the key's subject (subscribed before it publishes) and reads the key when it misses the
put, so a retried command, dropped by JetStream as a duplicate, gets the first one's verdict.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from taskbus.contracts.specs import (
    MAX_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    ConversationSpec,
    UserSettings,
)
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.subjects import CONVERSATION_ID_PATTERN

# A command id is a KV key and a subject token: the conversation ids' safe form.
CommandId = Annotated[str, msgspec.Meta(pattern=CONVERSATION_ID_PATTERN.pattern)]


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="command", tag=True):
    """Every command names the user it acts for; session-manager checks ownership."""

    user_id: str

    @classmethod
    def name(cls) -> str:
        return cls.__name__


class CreateConversation(Command):
    conversation_id: str
    spec: ConversationSpec


class ConversationCommand(Command):
    conversation_id: str
    # Where the verdict goes (see the module's docstring); None: nobody waits for one.
    command_id: CommandId | None = None


class SendMessage(ConversationCommand, kw_only=True):
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MESSAGE_CHARS)]


class StartConversation(ConversationCommand):
    pass


class PauseConversation(ConversationCommand):
    pass


class ResumeConversation(ConversationCommand):
    pass


class StopConversation(ConversationCommand, kw_only=True):
    reason: str = "user_stop"


class DeleteConversation(ConversationCommand):
    pass


class ConfirmAction(ConversationCommand, kw_only=True):
    confirmed: bool


class RenameConversation(ConversationCommand, kw_only=True):
    """A new title (OpenHands' PATCH of the conversation), already stripped by the gateway."""

    title: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]


class UpdateSettings(Command):
    settings: UserSettings


class CommandVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """Session-manager's answer to a conversation command. Accepted: its events are in the log,
    up to `last_event_id`, and `status` is the conversation's after them. Refused: nothing was
    appended; `status` is the current one and `reason` (machine-readable) and `detail` say why."""

    command_id: str
    conversation_id: str
    accepted: bool
    status: ConversationStatus | None = None
    reason: str = ""
    detail: str = ""
    last_event_id: int = -1


# Refusal reasons the gateway answers with something other than 409.
NOT_FOUND = "not_found"
QUEUE_FULL = "queue_full"


def encode_verdict(verdict: CommandVerdict) -> bytes:
    return _encoder.encode(verdict)


def decode_verdict(data: bytes) -> CommandVerdict:
    return msgspec.json.decode(data, type=CommandVerdict)


AnyCommand = (
    CreateConversation
    | SendMessage
    | StartConversation
    | PauseConversation
    | ResumeConversation
    | StopConversation
    | DeleteConversation
    | ConfirmAction
    | RenameConversation
    | UpdateSettings
)

_decoder: msgspec.json.Decoder[AnyCommand] = msgspec.json.Decoder(AnyCommand)
_encoder = msgspec.json.Encoder()


def encode_command(command: Command) -> bytes:
    return _encoder.encode(command)


def decode_command(data: bytes) -> AnyCommand:
    return _decoder.decode(data)
