"""The REST surface: conversations, their commands and their events; the user's settings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Annotated, Any, TypeVar

import msgspec
from fastapi import APIRouter, Header, Query, Request, Response

from taskbus.contracts.commands import (
    ConfirmAction,
    ConversationCommand,
    CreateConversation,
    DeleteConversation,
    PauseConversation,
    ResumeConversation,
    SendMessage,
    StartConversation,
    StopConversation,
    UpdateSettings,
)
from taskbus.contracts.events import EventSource
from taskbus.contracts.queries import (
    ConversationPage,
    EventPage,
    EventReply,
    GetEvent,
    ListConversations,
    SearchEvents,
)
from taskbus.contracts.queries import (
    Query as ContractQuery,
)
from taskbus.contracts.specs import ConversationSpec, UserSettings
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.wire import to_wire
from taskbus.gateway.conversations import (
    ConversationList,
    ConversationView,
    CreatedConversation,
    command_msg_id,
    conversation_id_for,
)
from taskbus.gateway.dependencies import BusDep, UserId
from taskbus.gateway.inputs import (
    EmptyBody,
    MessageBody,
    decode_body,
    repository_credentials_problem,
    validated,
)
from taskbus.gateway.problems import Problem, invalid_body
from taskbus.gateway.user_settings import SettingsView

router = APIRouter(prefix="/api")

Q = TypeVar("Q", bound=ContractQuery)
B = TypeVar("B", bound=msgspec.Struct)
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Makes a retried request safe: the same key acts once.",
    ),
]
_ACCEPTED = msgspec.json.encode({"status": "ok"})


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        msgspec.json.encode(content),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def contract_query(query_type: type[Q], **fields: Any) -> Q:
    """Build a contract query from request parameters; its own constraints make the 422s."""
    try:
        return msgspec.convert(fields, query_type)
    except msgspec.ValidationError as error:
        raise Problem(
            422, str(error), kind="validation-error", title="Invalid parameter"
        ) from error


def _split(values: list[str] | None) -> list[str]:
    """`kind=A&kind=B` and `kind=A,B` mean the same."""
    return [item for value in values or [] for item in value.split(",") if item]


async def _send(bus: BusDep, command: ConversationCommand, idempotency_key: str | None) -> Response:
    try:
        command = validated(command)
    except msgspec.ValidationError as error:
        raise invalid_body(error) from error
    await bus.owned_conversation(command.user_id, command.conversation_id)
    msg_id = command_msg_id(
        command.name(), command.conversation_id, command.user_id, idempotency_key
    )
    await bus.publish_command(command, msg_id)
    return Response(_ACCEPTED, status_code=202, media_type="application/json")


async def _body(request: Request, body_type: type[B]) -> B:
    try:
        return decode_body(await request.body(), body_type)
    except msgspec.DecodeError as error:
        raise invalid_body(error) from error


# --- conversations ----------------------------------------------------------------------------


@router.post("/conversations", status_code=201, summary="Create a conversation (start a task)")
async def create_conversation(
    request: Request, user: UserId, bus: BusDep, idempotency_key: IdempotencyKey = None
) -> Response:
    """Body: ConversationSpec. Answers once the conversation is visible (201), or 200 when an
    earlier request with the same Idempotency-Key already created it."""
    spec = await _body(request, ConversationSpec)
    credentials_problem = repository_credentials_problem(spec.repository)
    if credentials_problem is not None:
        raise Problem(422, credentials_problem, kind="validation-error", title="Invalid repository")
    cid = conversation_id_for(user, idempotency_key)
    command = CreateConversation(user_id=user, conversation_id=cid, spec=spec)
    info, created = await bus.create_conversation(command)
    if info.user_id != user:  # only if an id was forged to collide; never disclose it
        raise Problem(409, "conversation id already taken", kind="conflict")
    body = CreatedConversation(
        conversation_id=cid, conversation_status=info.status, conversation=ConversationView.of(info)
    )
    return json_response(
        body, status_code=201 if created else 200, headers={"Location": f"/api/conversations/{cid}"}
    )


@router.get("/conversations", summary="List your conversations (cursor pagination)")
async def list_conversations(
    user: UserId,
    bus: BusDep,
    page_id: str | None = None,
    limit: Annotated[int, Query(description="1..100")] = 20,
    status: ConversationStatus | None = None,
    repository: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    title: Annotated[str | None, Query(description="text contained in the title")] = None,
) -> Response:
    """Deleted (ARCHIVED) conversations are hidden unless asked for with `status=ARCHIVED`."""
    archived = ConversationStatus.ARCHIVED
    query = contract_query(
        ListConversations,
        user_id=user,
        page_id=page_id,
        limit=limit,
        status=status,
        repository=repository,
        created_after=created_after,
        created_before=created_before,
        title_contains=title,
        exclude_statuses=[] if status == archived else [archived],
    )
    page = await bus.ask(query, ConversationPage)
    results = [ConversationView.of(info) for info in page.conversations]
    return json_response(ConversationList(results=results, next_page_id=page.next_page_id))


@router.get("/conversations/{conversation_id}", summary="One conversation's state")
async def get_conversation(conversation_id: str, user: UserId, bus: BusDep) -> Response:
    info = await bus.owned_conversation(user, conversation_id)
    return json_response(ConversationView.of(info))


@router.delete("/conversations/{conversation_id}", status_code=202)
async def delete_conversation(
    conversation_id: str, user: UserId, bus: BusDep, idempotency_key: IdempotencyKey = None
) -> Response:
    command = DeleteConversation(user_id=user, conversation_id=conversation_id)
    return await _send(bus, command, idempotency_key)


@router.post("/conversations/{conversation_id}/message", status_code=202)
async def send_message(
    conversation_id: str,
    request: Request,
    user: UserId,
    bus: BusDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Body `{"message": "..."}`; also answers an agent waiting for input or confirmation."""
    body = await _body(request, MessageBody)
    command = SendMessage(user_id=user, conversation_id=conversation_id, content=body.message)
    return await _send(bus, command, idempotency_key)


def _control_endpoint(
    command_for: Callable[..., ConversationCommand],
) -> Callable[..., Awaitable[Response]]:
    async def endpoint(
        conversation_id: str,
        request: Request,
        user: UserId,
        bus: BusDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        await _body(request, EmptyBody)
        command = command_for(user_id=user, conversation_id=conversation_id)
        return await _send(bus, command, idempotency_key)

    return endpoint


# Bodyless commands: path suffix -> (command factory, summary).
_CONTROL_COMMANDS: dict[str, tuple[Callable[..., ConversationCommand], str]] = {
    "start": (StartConversation, "Start the conversation"),
    "stop": (StopConversation, "Stop the conversation"),
    "pause": (PauseConversation, "Pause the conversation"),
    "resume": (ResumeConversation, "Resume the conversation"),
    "confirm": (partial(ConfirmAction, confirmed=True), "Confirm the action awaiting approval"),
    "reject": (partial(ConfirmAction, confirmed=False), "Reject the action awaiting approval"),
}
for _action, (_command_for, _summary) in _CONTROL_COMMANDS.items():
    router.add_api_route(
        f"/conversations/{{conversation_id}}/{_action}",
        _control_endpoint(_command_for),
        methods=["POST"],
        status_code=202,
        summary=_summary,
        name=f"{_action}_conversation",
    )


# --- events -----------------------------------------------------------------------------------


@router.get("/conversations/{conversation_id}/events", summary="Search a conversation's events")
async def search_events(
    conversation_id: str,
    user: UserId,
    bus: BusDep,
    start_id: int = 0,
    end_id: Annotated[int | None, Query(description="inclusive")] = None,
    reverse: bool = False,
    limit: Annotated[int, Query(description="1..100")] = 20,
    kind: Annotated[list[str] | None, Query(description="repeatable or comma-separated")] = None,
    exclude_kind: Annotated[list[str] | None, Query()] = None,
    source: EventSource | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    query: Annotated[str | None, Query(description="substring of the event's text")] = None,
) -> Response:
    search = contract_query(
        SearchEvents,
        user_id=user,
        conversation_id=conversation_id,
        start_id=start_id,
        end_id=end_id,
        reverse=reverse,
        limit=limit,
        kinds=_split(kind),
        exclude_kinds=_split(exclude_kind),
        source=source,
        since=since,
        until=until,
        query=query,
    )
    await bus.owned_conversation(user, conversation_id)
    page = await bus.ask(search, EventPage)
    return json_response(
        {
            "events": [to_wire(raw) for raw in page.events],
            "has_more": page.has_more,
            "next_start_id": page.next_start_id,
        }
    )


@router.get("/conversations/{conversation_id}/events/{event_id}", summary="One event")
async def get_event(conversation_id: str, event_id: int, user: UserId, bus: BusDep) -> Response:
    query = contract_query(
        GetEvent, user_id=user, conversation_id=conversation_id, event_id=event_id
    )
    await bus.owned_conversation(user, conversation_id)
    reply = await bus.ask(query, EventReply)
    return json_response(to_wire(reply.event))


# --- settings ---------------------------------------------------------------------------------


@router.get("/settings", summary="Your settings (the LLM API key only as llm_api_key_set)")
async def get_user_settings(user: UserId, bus: BusDep) -> Response:
    return json_response(SettingsView.of(await bus.user_settings(user)))


@router.put("/settings", summary="Replace your settings")
async def put_user_settings(request: Request, user: UserId, bus: BusDep) -> Response:
    """Body: UserSettings; it replaces every setting, except that an absent or null
    `llm_api_key` keeps the stored key (`""` clears it). Answers once the settings are stored."""
    settings = await _body(request, UserSettings)
    stored = await bus.update_settings(UpdateSettings(user_id=user, settings=settings))
    return json_response(SettingsView.of(stored))


@router.get("/health", summary="Liveness: the gateway and its NATS connection")
async def health(bus: BusDep) -> Response:
    connected = bus.connected
    return json_response(
        {"status": "ok" if connected else "degraded", "nats": connected},
        status_code=200 if connected else 503,
    )
