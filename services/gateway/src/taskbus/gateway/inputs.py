"""What clients send (REST bodies, WebSocket actions) and the contract commands they become."""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec
from starlette.requests import Request

from taskbus.contracts.commands import (
    Command,
    ConfirmAction,
    PauseConversation,
    ResumeConversation,
    SendMessage,
    StopConversation,
    encode_command,
)
from taskbus.contracts.redaction import repository_credential
from taskbus.contracts.specs import MAX_MESSAGE_CHARS
from taskbus.gateway.problems import Problem, content_too_large

C = TypeVar("C", bound=Command)
B = TypeVar("B", bound=msgspec.Struct)
T = TypeVar("T")


# A user message, bounded as the command it becomes (SendMessage.content).
MessageText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MESSAGE_CHARS)]


class MessageBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /api/conversations/{id}/message."""

    message: MessageText


class EmptyBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of the control endpoints (start, stop, pause, resume): nothing, or `{}`."""


def decode_json(data: str | bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode with `decoder`; JSON nested too deeply for the decoder is invalid input like any
    other (msgspec raises RecursionError for it). Raises msgspec.DecodeError/ValidationError."""
    try:
        return decoder.decode(data)
    except RecursionError as error:
        raise msgspec.ValidationError("JSON is nested too deeply") from error


def decode_body(body: bytes, body_type: type[B]) -> B:
    """Decode a request body; an empty body is `{}`. Raises msgspec.DecodeError/ValidationError."""
    return decode_json(body or b"{}", msgspec.json.Decoder(body_type))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, or a 413 Problem as soon as it exceeds `max_bytes`: a larger body could
    never travel as one NATS message, and reading it whole would let a client fill memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise content_too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise content_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def repository_problem(repository: str | None) -> Problem | None:
    """A 422 when the repository URL carries (or could hide) a credential: it would be stored
    in the log. The policy is `taskbus.contracts.redaction`'s."""
    reason = None if repository is None else repository_credential(repository)
    if reason is None:
        return None
    return Problem(422, reason, kind="repository-credentials", title="Invalid repository")


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
    message: MessageText


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
    return decode_json(text, _client_action_decoder)


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
