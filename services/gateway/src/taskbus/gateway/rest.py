"""The REST surface: conversations, their commands and their events; the user's settings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any, TypeVar

import msgspec
from fastapi import APIRouter, Header, Path, Query, Request, Response

from taskbus.contracts import git_providers
from taskbus.contracts.commands import (
    CommandVerdict,
    ConfirmAction,
    ConversationCommand,
    CreateConversation,
    DeleteConversation,
    PauseConversation,
    RenameConversation,
    ResumeConversation,
    SendMessage,
    StartConversation,
    StopConversation,
    UpdateSettings,
)
from taskbus.contracts.events import EventSource, RuntimeStatusChanged
from taskbus.contracts.observability_health import InstanceHealth, readiness
from taskbus.contracts.openhands import OPENHANDS_STATUS, ConversationTrigger, OpenHandsStatus
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
from taskbus.contracts.runners import RunnerInfo, SandboxIsolation
from taskbus.contracts.specs import (
    MAX_NAME_CHARS,
    MAX_QUERY_TEXT_CHARS,
    MAX_URL_CHARS,
    ConversationSpec,
    UserSettings,
)
from taskbus.contracts.status import ConversationStatus
from taskbus.contracts.wire import to_wire
from taskbus.gateway.conversations import (
    ConversationList,
    ConversationView,
    CreatedConversation,
    command_msg_id,
    conversation_id_for,
)
from taskbus.gateway.dependencies import BusDep, CreateRateDep, UserId
from taskbus.gateway.dependencies_check import check_dependencies
from taskbus.gateway.event_filter import FilterParameter, with_event_filter
from taskbus.gateway.inputs import (
    EmptyBody,
    MessageBody,
    StartBody,
    decode_body,
    init_session,
    read_body,
    repository_problem,
    validated,
)
from taskbus.gateway.mcp_inputs import sealed_mcp_config
from taskbus.gateway.openhands_inputs import AddEventBody, RenameBody
from taskbus.gateway.problems import Problem, invalid_body, rate_limited
from taskbus.gateway.user_settings import (
    SettingsView,
    admissible,
    openhands_settings,
)

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


class CommandAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """Answer to an accepted command: OpenHands' ConversationResponse (`status: "ok"`,
    `conversation_id`, `message`, `conversation_status`), then Taskbus' own status and the id
    of the command's last event, which every read now includes."""

    status: str = "ok"
    conversation_id: str
    message: str | None = None
    conversation_status: OpenHandsStatus | None
    taskbus_status: ConversationStatus | None
    last_event_id: int

    @classmethod
    def of(cls, verdict: CommandVerdict) -> CommandAccepted:
        return cls(
            conversation_id=verdict.conversation_id,
            conversation_status=None
            if verdict.status is None
            else OPENHANDS_STATUS[verdict.status],
            taskbus_status=verdict.status,
            last_event_id=verdict.last_event_id,
        )


# RFC 3339 times are parsed by the contract (msgspec, strictly) rather than by FastAPI, which
# would also take a number as a Unix time; the pattern documents the years the store can hold
# (queries.EARLIEST_TIME..LATEST_TIME), which the contract enforces.
_TIME_PATTERN = r"^(19\d\d|2[01]\d\d|22[0-5]\d|226[01])-\d\d-\d\dT"


def time_parameter(description: str) -> Any:
    return Query(
        description=f"RFC 3339 date-time, {description}",
        pattern=_TIME_PATTERN,
        json_schema_extra={"format": "date-time"},
    )


Since = Annotated[str | None, time_parameter("inclusive")]
Until = Annotated[str | None, time_parameter("exclusive")]
Limit = Annotated[int, Query(description="1..100", ge=1, le=100)]
# Event kinds are event type names (`MessageAction`); several are repeated or comma-separated.
Kinds = Annotated[
    list[Annotated[str, Query(pattern=r"^[A-Z][A-Za-z0-9]*(,[A-Z][A-Za-z0-9]*)*$")]] | None,
    Query(description="event kinds, repeatable or comma-separated"),
]


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


class EventAdded(CommandAccepted, frozen=True, kw_only=True):
    """Answer to add_event: OpenHands' `{success: true}`, with the accepted command's fields."""

    success: bool = True


async def _send(bus: BusDep, command: ConversationCommand, idempotency_key: str | None) -> Response:
    """202 once session-manager accepted the command and its events are in the log; a refused
    command is a 409 problem with the conversation's current status and the reason."""
    verdict = await _decide(bus, command, idempotency_key)
    return json_response(CommandAccepted.of(verdict), status_code=202)


async def _decide(
    bus: BusDep, command: ConversationCommand, idempotency_key: str | None
) -> CommandVerdict:
    """Session-manager's verdict on an accepted command (a refused one raises the 409)."""
    try:
        command = validated(command)
    except msgspec.ValidationError as error:
        raise invalid_body(error) from error
    await bus.check_owner(command.user_id, command.conversation_id)
    command_id = command_msg_id(
        command.name(), command.conversation_id, command.user_id, idempotency_key
    )
    return await bus.send_command(command, command_id, fresh_id=idempotency_key is None)


async def typed_body(request: Request, bus: BusDep, body_type: type[B]) -> B:
    """The decoded body; no body may be larger than one message on the bus (413)."""
    body = await read_body(request, bus.nc.max_payload)
    try:
        return decode_body(body, body_type)
    except msgspec.DecodeError as error:
        raise invalid_body(error) from error


# --- conversations ----------------------------------------------------------------------------


@router.post("/conversations", status_code=201, summary="Create a conversation (start a task)")
async def create_conversation(
    request: Request,
    user: UserId,
    bus: BusDep,
    create_rate: CreateRateDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Body: ConversationSpec. Answers once the conversation is visible (201), or 200 when an
    earlier request with the same Idempotency-Key already created it. Each user may create
    `TASKBUS_CREATE_BURST` conversations at once, then `TASKBUS_CREATE_RATE_PER_MINUTE` (429
    with Retry-After beyond that). `depends_on` must name conversations of yours, without a
    cycle (422)."""
    spec = await init_session(await typed_body(request, bus, ConversationSpec))
    credentials_problem = repository_problem(spec.repository)
    if credentials_problem is not None:
        raise credentials_problem
    box = request.app.state.settings_policy.box
    spec = msgspec.structs.replace(spec, mcp_config=sealed_mcp_config(spec.mcp_config, user, box))
    if spec.repository and spec.git_provider:
        unresolvable = git_providers.repository_problem(spec.repository, spec.git_provider)
        if unresolvable is not None:
            raise Problem(422, unresolvable, kind="repository-provider", title="Invalid repository")
    retry_after = create_rate.take(user)
    if retry_after is not None:
        raise rate_limited(retry_after, "too many conversations created; retry later")
    cid = conversation_id_for(user, idempotency_key)
    await check_dependencies(bus, user, cid, spec.depends_on)
    command = CreateConversation(user_id=user, conversation_id=cid, spec=spec)
    info, created = await bus.create_conversation(command)
    if info.user_id != user:  # only if an id was forged to collide; never disclose it
        raise Problem(409, "conversation id already taken", kind="conflict")
    body = CreatedConversation(
        conversation_id=cid,
        conversation_status=OPENHANDS_STATUS[info.status],
        conversation=ConversationView.of(info),
    )
    return json_response(
        body, status_code=201 if created else 200, headers={"Location": f"/api/conversations/{cid}"}
    )


@router.get("/conversations", summary="List your conversations (cursor pagination)")
async def list_conversations(
    user: UserId,
    bus: BusDep,
    page_id: Annotated[str | None, Query(max_length=MAX_QUERY_TEXT_CHARS)] = None,
    limit: Limit = 20,
    status: ConversationStatus | None = None,
    repository: Annotated[str | None, Query(max_length=MAX_URL_CHARS)] = None,
    created_after: Since = None,
    created_before: Until = None,
    title: Annotated[
        str | None, Query(description="text contained in the title", max_length=MAX_NAME_CHARS)
    ] = None,
    selected_repository: Annotated[
        str | None, Query(description="OpenHands' name for `repository`", max_length=MAX_URL_CHARS)
    ] = None,
    conversation_trigger: ConversationTrigger | None = None,
) -> Response:
    """Deleted (ARCHIVED) conversations are never listed: deleted means gone, and their
    events are purged soon after. `status` is Taskbus' status (`taskbus_status`).
    `conversation_trigger` filters each page after it is read, as OpenHands does, so a page may
    hold fewer than `limit` and still have a next one."""
    if repository is not None and selected_repository is not None:
        raise Problem(
            422, "give repository or selected_repository, not both", kind="validation-error"
        )
    query = contract_query(
        ListConversations,
        user_id=user,
        page_id=page_id,
        limit=limit,
        status=status,
        repository=repository if repository is not None else selected_repository,
        created_after=created_after,
        created_before=created_before,
        title_contains=title,
        exclude_statuses=[ConversationStatus.ARCHIVED],
    )
    page = await bus.ask(query, ConversationPage)
    results = [
        ConversationView.of(info)
        for info in page.conversations
        if conversation_trigger is None or info.trigger == conversation_trigger
    ]
    return json_response(ConversationList(results=results, next_page_id=page.next_page_id))


@router.get("/conversations/{conversation_id}", summary="One conversation's state")
async def get_conversation(conversation_id: str, user: UserId, bus: BusDep) -> Response:
    """Folded from the log, so it includes every event up to `last_event_id`; a deleted
    conversation (or another user's) is a 404."""
    info = await bus.owned_conversation(user, conversation_id)
    return json_response(ConversationView.of(info))


@router.delete(
    "/conversations/{conversation_id}", status_code=202, summary="Delete the conversation"
)
async def delete_conversation(
    conversation_id: str, user: UserId, bus: BusDep, idempotency_key: IdempotencyKey = None
) -> Response:
    """Deleted means gone: once accepted (202), GET, the events, the WebSocket and the list
    answer 404, and the conversation's events, rows and workspace are purged."""
    command = DeleteConversation(user_id=user, conversation_id=conversation_id)
    return await _send(bus, command, idempotency_key)


@router.patch(
    "/conversations/{conversation_id}", status_code=202, summary="Rename the conversation"
)
async def rename_conversation(
    conversation_id: str,
    request: Request,
    user: UserId,
    bus: BusDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Body `{"title": "..."}` (OpenHands' UpdateConversationRequest; the title is stripped, 1..200
    characters). Answers OpenHands' `true` once the new title is in the log, so GET and the
    list show it at once; allowed in every status but deleted."""
    title = (await typed_body(request, bus, RenameBody)).stripped_title()
    command = RenameConversation(user_id=user, conversation_id=conversation_id, title=title)
    await _decide(bus, command, idempotency_key)
    return json_response(True, status_code=202)


@router.post(
    "/conversations/{conversation_id}/message", status_code=202, summary="Send a user message"
)
async def send_message(
    conversation_id: str,
    request: Request,
    user: UserId,
    bus: BusDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Body `{"message": "..."}`; also answers an agent waiting for input or confirmation."""
    body = await typed_body(request, bus, MessageBody)
    command = SendMessage(user_id=user, conversation_id=conversation_id, content=body.message)
    return await _send(bus, command, idempotency_key)


def _control_endpoint(
    command_for: Callable[..., ConversationCommand], body_type: type[EmptyBody]
) -> Callable[..., Awaitable[Response]]:
    async def endpoint(
        conversation_id: str,
        request: Request,
        user: UserId,
        bus: BusDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        await typed_body(request, bus, body_type)
        command = command_for(user_id=user, conversation_id=conversation_id)
        return await _send(bus, command, idempotency_key)

    return endpoint


_VERDICT = (
    "202 with the status after the command once session-manager accepted it and its events are "
    "in the log; 409 (with the current status and the reason) when the conversation's status "
    "does not allow it, as the contracts' transition table says."
)
# Commands whose body changes nothing: path suffix -> (command factory, body, summary).
CONTROL_COMMANDS: dict[str, tuple[Callable[..., ConversationCommand], type[EmptyBody], str]] = {
    "start": (StartConversation, StartBody, "Start the conversation"),
    "stop": (StopConversation, EmptyBody, "Stop the conversation"),
    "pause": (PauseConversation, EmptyBody, "Pause the conversation"),
    "resume": (ResumeConversation, EmptyBody, "Resume the conversation"),
    "confirm": (
        partial(ConfirmAction, confirmed=True),
        EmptyBody,
        "Confirm the action awaiting approval",
    ),
    "reject": (
        partial(ConfirmAction, confirmed=False),
        EmptyBody,
        "Reject the action awaiting approval",
    ),
}
for _action, (_command_for, _body_type, _summary) in CONTROL_COMMANDS.items():
    router.add_api_route(
        f"/conversations/{{conversation_id}}/{_action}",
        _control_endpoint(_command_for, _body_type),
        methods=["POST"],
        status_code=202,
        summary=_summary,
        description=_VERDICT,
        name=f"{_action}_conversation",
    )


# --- events -----------------------------------------------------------------------------------


@router.get("/conversations/{conversation_id}/events", summary="Search a conversation's events")
async def search_events(
    conversation_id: str,
    request: Request,
    user: UserId,
    bus: BusDep,
    start_id: Annotated[int, Query(ge=0)] = 0,
    end_id: Annotated[int | None, Query(description="inclusive", ge=0)] = None,
    reverse: bool = False,
    limit: Limit = 20,
    kind: Kinds = None,
    exclude_kind: Kinds = None,
    source: EventSource | None = None,
    since: Since = None,
    until: Until = None,
    query: Annotated[
        str | None,
        Query(description="substring of the event's text", max_length=MAX_QUERY_TEXT_CHARS),
    ] = None,
    filter: FilterParameter = None,
) -> Response:
    """The criteria may also come as OpenHands' EventFilter, in the GET's JSON body (where
    OpenHands reads it) or as the `filter` parameter's JSON; naming a criterion both there and
    as a parameter is a 422."""
    flat = {
        "kinds": _split(kind),
        "exclude_kinds": _split(exclude_kind),
        "source": source,
        "since": since,
        "until": until,
        "query": query,
    }
    body = await read_body(request, bus.nc.max_payload)
    search = contract_query(
        SearchEvents,
        user_id=user,
        conversation_id=conversation_id,
        start_id=start_id,
        end_id=end_id,
        reverse=reverse,
        limit=limit,
        **with_event_filter(flat, filter, body),
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
async def get_event(
    conversation_id: str, event_id: Annotated[int, Path(ge=0)], user: UserId, bus: BusDep
) -> Response:
    """The event with this id, in the same wire view as `/events` and the WebSocket."""
    query = contract_query(
        GetEvent, user_id=user, conversation_id=conversation_id, event_id=event_id
    )
    await bus.owned_conversation(user, conversation_id)
    reply = await bus.ask(query, EventReply)
    return json_response(to_wire(reply.event))


@router.post(
    "/conversations/{conversation_id}/events",
    status_code=202,
    summary="Add a user message as an OpenHands event (add_event)",
)
async def add_event(
    conversation_id: str,
    request: Request,
    user: UserId,
    bus: BusDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Body: an OpenHands event dict. Only a user `MessageAction`
    (`{"action": "message", "args": {"content": "..."}}`) is taken, as `/message` takes it;
    any other event is a 422 saying why. Answers OpenHands' `{success: true}` with the
    accepted command's fields."""
    content = (await typed_body(request, bus, AddEventBody)).user_message()
    command = SendMessage(user_id=user, conversation_id=conversation_id, content=content)
    verdict = await _decide(bus, command, idempotency_key)
    return json_response(EventAdded.of(verdict), status_code=202)


@router.get("/conversations/{conversation_id}/trajectory", summary="The whole event history")
async def get_trajectory(
    conversation_id: str, request: Request, user: UserId, bus: BusDep
) -> Response:
    """OpenHands' `{trajectory: [...]}`: every event, in order, as `/events` serves it. Read in
    pages from the event store (read-your-writes as `/events`); a trajectory larger than
    `TASKBUS_TRAJECTORY_MAX_BYTES` is a 413, to be read in pages from `/events` instead."""
    await bus.owned_conversation(user, conversation_id)
    max_bytes: int = request.app.state.settings.trajectory_max_bytes
    trajectory: list[dict[str, Any]] = []
    size, start_id = 0, 0
    while True:
        search = contract_query(
            SearchEvents,
            user_id=user,
            conversation_id=conversation_id,
            start_id=start_id,
            limit=100,
        )
        page = await bus.ask(search, EventPage)
        size += sum(len(raw) for raw in page.events)
        if size > max_bytes:
            raise Problem(
                413,
                f"the trajectory is larger than {max_bytes} bytes; read it from /events in pages",
                kind="content-too-large",
                title="Trajectory too large",
                max_bytes=max_bytes,
            )
        trajectory += (to_wire(raw) for raw in page.events)
        if not page.has_more or page.next_start_id is None:
            return json_response({"trajectory": trajectory})
        start_id = page.next_start_id


@router.get("/conversations/{conversation_id}/config", summary="The conversation's runtime ids")
async def get_runtime_config(conversation_id: str, user: UserId, bus: BusDep) -> Response:
    """OpenHands' `{runtime_id, session_id}`: the id of the sandbox the conversation last had
    (null before it has one) and the conversation's id, which is OpenHands' session id."""
    await bus.owned_conversation(user, conversation_id)
    runtime = await bus.last_event(conversation_id, RuntimeStatusChanged)
    runtime_id = runtime.sandbox_id if runtime is not None and runtime.sandbox_id else None
    return json_response({"runtime_id": runtime_id, "session_id": conversation_id})


# --- settings ---------------------------------------------------------------------------------


@router.get("/settings", summary="Your settings (the LLM API key only as llm_api_key_set)")
async def get_user_settings(user: UserId, bus: BusDep) -> Response:
    """Defaults until the user stores settings; OpenHands' ApiSettings keys Taskbus has no
    setting for come back as fixed values (docs/openhands-compat.md)."""
    return json_response(
        SettingsView.of(await bus.user_settings(user), await bus.user_secrets(user))
    )


@router.put("/settings", summary="Replace your settings")
async def put_user_settings(request: Request, user: UserId, bus: BusDep) -> Response:
    """Body: UserSettings; it replaces every setting, except that an absent or null
    `llm_api_key` keeps the stored key (`""` clears it). `llm_model`, `llm_base_url` and
    `llm_api_key` are one set, used without the server's own: the model names its provider, the
    base URL must be one the operator allows and not a private address (422 otherwise). Answers
    once the settings are stored."""
    return await _store_settings(request, user, bus, await typed_body(request, bus, UserSettings))


@router.post("/settings", summary="Replace your settings (OpenHands' spelling of PUT)")
async def post_user_settings(request: Request, user: UserId, bus: BusDep) -> Response:
    """As PUT, for OpenHands clients: the ApiSettings keys Taskbus has no setting for (`agent`,
    `language`, ...; see docs/openhands-compat.md) are dropped instead of refused."""
    body = await read_body(request, bus.nc.max_payload)
    try:
        settings = openhands_settings(body)
    except msgspec.DecodeError as error:
        raise invalid_body(error) from error
    return await _store_settings(request, user, bus, settings)


async def _store_settings(
    request: Request, user: str, bus: BusDep, settings: UserSettings
) -> Response:
    policy = request.app.state.settings_policy
    admitted = await admissible(settings, user, policy)
    admitted = msgspec.structs.replace(
        admitted, mcp_config=sealed_mcp_config(admitted.mcp_config, user, policy.box)
    )
    stored = await bus.update_settings(UpdateSettings(user_id=user, settings=admitted))
    return json_response(SettingsView.of(stored, await bus.user_secrets(user)))


def _isolation_warnings(runners: list[RunnerInfo]) -> list[str]:
    """Loud lines for runners whose sandboxes are not isolated (or when none is known)."""
    if not runners:
        return ["no runtime-runner has registered: sandbox isolation unknown"]
    return [
        f"runner {runner.runner_id} on {runner.host} runs sandboxes UNSANDBOXED "
        f"(backend {runner.backend}, isolation none): {runner.warning or 'no isolation'}"
        for runner in runners
        if runner.isolation == SandboxIsolation.NONE
    ]


def _instance(nonce: str | None) -> dict[str, str]:
    return {} if nonce is None else {"instance": nonce}


@router.get(
    "/health",
    summary="Liveness: the gateway, its NATS connection, sandbox isolation",
    responses={503: {"description": "NATS is unreachable (`status: degraded`)"}},
)
async def health(request: Request, bus: BusDep) -> Response:
    """`runners` names each runtime-runner's sandbox backend and isolation; `warnings` says
    loudly when a runner runs untrusted code unsandboxed (isolation `none`). `services` is each
    other service's readiness (its instances' heartbeats), `ready` whether all are: the status
    code stays the gateway's own liveness, so a probe does not pull gateways from service for
    another service's outage."""
    connected = bus.connected
    runners: list[RunnerInfo] = []
    warnings: list[str] = []
    instances: list[InstanceHealth] = []
    if connected:
        try:
            runners = await bus.runners()
            warnings = _isolation_warnings(runners)
            instances = await bus.service_health()
        except Problem as problem:
            warnings = [problem.detail]
    services = readiness(instances, datetime.now(UTC))
    return json_response(
        {
            "status": "ok" if connected else "degraded",
            "nats": connected,
            "ready": connected and all(service.ready for service in services.values()),
            "services": services,
            "runners": runners,
            "warnings": warnings,
            # Only under `taskbus up`, which waits for its own nonce here.
            **_instance(request.app.state.settings.instance_nonce),
        },
        status_code=200 if connected else 503,
    )
