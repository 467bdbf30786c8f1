"""Requests to session-manager (not facts): sent on TASKBUS_COMMANDS by the gateway."""

from __future__ import annotations

from typing import Annotated

import msgspec

from taskbus.contracts.specs import MAX_MESSAGE_CHARS, ConversationSpec, UserSettings


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


class SendMessage(ConversationCommand):
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MESSAGE_CHARS)]


class StartConversation(ConversationCommand):
    pass


class PauseConversation(ConversationCommand):
    pass


class ResumeConversation(ConversationCommand):
    pass


class StopConversation(ConversationCommand):
    reason: str = "user_stop"


class DeleteConversation(ConversationCommand):
    pass


class ConfirmAction(ConversationCommand):
    confirmed: bool


class UpdateSettings(Command):
    settings: UserSettings


AnyCommand = (
    CreateConversation
    | SendMessage
    | StartConversation
    | PauseConversation
    | ResumeConversation
    | StopConversation
    | DeleteConversation
    | ConfirmAction
    | UpdateSettings
)

_decoder: msgspec.json.Decoder[AnyCommand] = msgspec.json.Decoder(AnyCommand)
_encoder = msgspec.json.Encoder()


def encode_command(command: Command) -> bytes:
    return _encoder.encode(command)


def decode_command(data: bytes) -> AnyCommand:
    return _decoder.decode(data)
