"""What clients send (REST bodies, WebSocket actions) and the contract commands they become."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
from starlette.requests import Request

from taskbus.contracts.commands import (
    Command,
    ConfirmAction,
    ConversationCommand,
    PauseConversation,
    ResumeConversation,
    SendMessage,
    StopConversation,
    encode_command,
)
from taskbus.contracts.llm_endpoints import is_public
from taskbus.contracts.openhands import suggested_task_prompt
from taskbus.contracts.redaction import repository_credential
from taskbus.contracts.specs import MAX_MESSAGE_CHARS, ConversationSpec
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


class StartBody(EmptyBody, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of start: OpenHands' ProvidersSetModel. The conversation's own `git_provider` picks
    the token its clone uses, so the providers are accepted and change nothing."""

    providers_set: (
        Annotated[
            list[Literal["github", "gitlab", "bitbucket", "enterprise_sso"]],
            msgspec.Meta(max_length=8),
        ]
        | None
    ) = None


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


_RESOLVE_SECONDS = 5.0


async def _image_problem(url: str) -> str | None:
    """Why an image URL may not reach the LLM, or None. An https image is fetched by the LLM
    client or provider, so its host must resolve, now, to public addresses only (as a user's
    LLM base URL must); a `data:` image needs no fetch."""
    if url.startswith("data:"):
        return None
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return f"{url[:80]!r} is not a valid URL"
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            async with asyncio.timeout(_RESOLVE_SECONDS):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, 443, type=socket.SOCK_STREAM
                )
        except (OSError, TimeoutError, UnicodeError):  # UnicodeError: a label IDNA refuses
            return f"image host {host[:80]!r} does not resolve"
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not all(is_public(address) for address in addresses):
        return f"image host {host!r} is a loopback, private or link-local address"
    return None


def _refused(detail: str, *, status: int = 422, **extensions: Any) -> Problem:
    return Problem(status, detail, kind="unsupported-field", title="Request refused", **extensions)


async def init_session(spec: ConversationSpec) -> ConversationSpec:
    """OpenHands' InitSessionRequest as its `new_conversation` reads it (manage_conversations.py
    at 0.56.0): a suggested task writes the first message, `create_microagent` names the
    repository, and an empty create is refused (400 with OpenHands' msg_id; OpenHands refuses
    any API-key create without a first message, Taskbus lets one that names something wait for
    its first message). `replay_json` is refused with a 422 saying why."""
    if spec.replay_json is not None:
        raise _refused(
            "replay_json is not supported: Taskbus replays its own event log (reconnect the "
            "WebSocket with after_id), not OpenHands trajectories; send the task as "
            "initial_user_msg"
        )
    for url in spec.image_urls:
        reason = await _image_problem(url)
        if reason is not None:
            raise _refused(reason)
    updates: dict[str, object] = {}
    if spec.suggested_task is not None:
        task = spec.suggested_task
        updates["initial_user_msg"] = suggested_task_prompt(task)
        updates["repository"] = spec.repository or task.repo
        updates["git_provider"] = spec.git_provider or task.git_provider
    elif spec.create_microagent is not None:
        updates["repository"] = spec.repository or spec.create_microagent.repo
        updates["git_provider"] = spec.git_provider or spec.create_microagent.git_provider
    if spec == ConversationSpec():
        raise _refused(
            "Missing initial user message: a create must say what to do (initial_user_msg or "
            "suggested_task) or at least name something (e.g. a repository or title)",
            status=400,
            msg_id="CONFIGURATION$MISSING_USER_MESSAGE",
        )
    return msgspec.structs.replace(spec, **updates)


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


def command_for_action(
    action: AnyClientAction, user_id: str, conversation_id: str
) -> ConversationCommand:
    """The command a WebSocket action stands for, validated against the contract."""
    u, c = user_id, conversation_id
    command: ConversationCommand
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
