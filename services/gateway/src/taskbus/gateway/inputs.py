"""What clients send (REST bodies, WebSocket actions) and the contract commands they become."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from taskbus.contracts.commands import (
    Command,
    ConfirmAction,
    PauseConversation,
    ResumeConversation,
    SendMessage,
    StopConversation,
    encode_command,
)

C = TypeVar("C", bound=Command)
B = TypeVar("B", bound=msgspec.Struct)


class MessageBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /api/conversations/{id}/message."""

    message: str


class EmptyBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of the control endpoints (start, stop, pause, resume): nothing, or `{}`."""


def decode_body(body: bytes, body_type: type[B]) -> B:
    """Decode a request body; an empty body is `{}`. Raises msgspec.DecodeError/ValidationError."""
    return msgspec.json.decode(body or b"{}", type=body_type)


# `scheme://userinfo@host`: a token or password in the URL would be stored in the event log.
_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<userinfo>[^/@]*)@")


def repository_credentials_problem(repository: str | None) -> str | None:
    """Why a repository URL may not be accepted, or None. URLs end up in events, so they must
    not carry secrets: `https://token@host/...` and `scheme://user:password@...` are refused,
    while plain user names such as `ssh://git@host/...` are fine."""
    if repository is None:
        return None
    match = _URL_USERINFO.match(repository)
    if match is None:
        return None
    if ":" in match["userinfo"] or repository.lower().startswith(("http://", "https://")):
        return "repository URLs must not carry credentials (they would be stored in the log)"
    return None


def validated(command: C) -> C:
    """Enforce the contract's field constraints (lengths, ranges), which msgspec checks only
    on decode, before a command leaves the gateway. Raises msgspec.ValidationError."""
    return msgspec.json.decode(encode_command(command), type=type(command))


# --- WebSocket client messages ----------------------------------------------------------------


class ClientAction(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="action"
):
    """A message a WebSocket client sends: `{"action": ..., ...}`."""


class MessageClientAction(ClientAction, frozen=True, tag="message"):
    message: str


class PauseClientAction(ClientAction, frozen=True, tag="pause"):
    pass


class ResumeClientAction(ClientAction, frozen=True, tag="resume"):
    pass


class StopClientAction(ClientAction, frozen=True, tag="stop"):
    pass


class ConfirmClientAction(ClientAction, frozen=True, tag="confirm"):
    pass


class RejectClientAction(ClientAction, frozen=True, tag="reject"):
    pass


AnyClientAction = (
    MessageClientAction
    | PauseClientAction
    | ResumeClientAction
    | StopClientAction
    | ConfirmClientAction
    | RejectClientAction
)

_client_action_decoder: msgspec.json.Decoder[AnyClientAction] = msgspec.json.Decoder(
    AnyClientAction
)


def decode_client_action(text: str | bytes) -> AnyClientAction:
    """Raises msgspec.DecodeError (ValidationError for a wrong shape)."""
    return _client_action_decoder.decode(text)


def command_for_action(action: AnyClientAction, user_id: str, conversation_id: str) -> Command:
    """The command a WebSocket action stands for, validated against the contract."""
    u, c = user_id, conversation_id
    command: Command
    match action:
        case MessageClientAction(message=message):
            command = SendMessage(user_id=u, conversation_id=c, content=message)
        case PauseClientAction():
            command = PauseConversation(user_id=u, conversation_id=c)
        case ResumeClientAction():
            command = ResumeConversation(user_id=u, conversation_id=c)
        case StopClientAction():
            command = StopConversation(user_id=u, conversation_id=c)
        case ConfirmClientAction():
            command = ConfirmAction(user_id=u, conversation_id=c, confirmed=True)
        case RejectClientAction():
            command = ConfirmAction(user_id=u, conversation_id=c, confirmed=False)
    return validated(command)
