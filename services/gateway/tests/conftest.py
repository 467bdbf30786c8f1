"""Gateway fixtures: the app over a real nats-server, and minimal stand-ins for session-manager
(appends ConversationCreated, stores settings when asked) and event-store (answers queries from
the log, analytics with fixed reports)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.commands import (
    AnyCommand,
    CommandVerdict,
    ConversationCommand,
    CreateConversation,
    UpdateSettings,
    decode_command,
    encode_verdict,
)
from taskbus.contracts.events import (
    ConversationCreated,
    ConversationRejected,
    ConversationStatusChanged,
    EventSource,
    MessageAction,
)
from taskbus.contracts.queries import (
    ConversationPage,
    CostAnalytics,
    CostBucket,
    CostReport,
    DurationAnalytics,
    DurationReport,
    EventKindCounts,
    EventKindReport,
    EventPage,
    EventReply,
    FailingCommand,
    FailingCommands,
    FailingCommandsReport,
    GetEvent,
    KindCount,
    ListConversations,
    OutcomeStats,
    Query,
    QueryError,
    Reply,
    SearchEvents,
)
from taskbus.contracts.secret_box import generate_key
from taskbus.contracts.specs import ConversationSpec, UserSettings
from taskbus.contracts.status import ConversationStatus
from taskbus.devtools.nats_server import NatsServer, free_port
from taskbus.gateway.app import create_app
from taskbus.gateway.bus import Bus
from taskbus.gateway.settings import GatewaySettings

ALICE_KEY, BOB_KEY = "alice-secret-key", "bob-secret-key"
# Seals users' LLM keys (taskbus.contracts.secret_box), as `taskbus up`'s key file does.
SECRETS_KEY = generate_key()


@pytest.fixture
def alice() -> dict[str, str]:
    """Request headers of user alice."""
    return {"Authorization": f"Bearer {ALICE_KEY}"}


@pytest.fixture
def bob() -> dict[str, str]:
    return {"Authorization": f"Bearer {BOB_KEY}"}


@pytest.fixture
def settings(nats_url: str) -> GatewaySettings:
    return GatewaySettings(
        nats_url=nats_url,
        api_keys=f"{ALICE_KEY}=alice,{BOB_KEY}=bob",
        request_timeout_seconds=2.0,
        ws_heartbeat_seconds=0.5,
        ws_max_buffered_events=50,
        secrets_key=SECRETS_KEY,
    )


@pytest.fixture
async def app(settings: GatewaySettings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        yield http


@contextlib.asynccontextmanager
async def served_gateway(settings: GatewaySettings) -> AsyncIterator[str]:
    """The gateway served by a real uvicorn on a free port (for WebSocket clients)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def server_url(settings: GatewaySettings) -> AsyncIterator[str]:
    async with served_gateway(settings) as url:
        yield url


@pytest.fixture
async def default_buffer_server_url(settings: GatewaySettings) -> AsyncIterator[str]:
    """The gateway served as by `server_url`, with the default WebSocket buffer (1000 events)
    rather than the tests' 50, for a burst that readers which keep up must ride out."""
    fields = msgspec.structs.fields(GatewaySettings)
    default = next(f.default for f in fields if f.name == "ws_max_buffered_events")
    async with served_gateway(
        msgspec.structs.replace(settings, ws_max_buffered_events=default)
    ) as url:
        yield url


@pytest.fixture
def restartable_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of one test alone, so the test may stop and start it (same port, same
    store) without disturbing the session's server."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def restartable_server_url(
    settings: GatewaySettings, restartable_nats: NatsServer
) -> AsyncIterator[str]:
    """The gateway, served as by `server_url`, on `restartable_nats`."""
    on_own_server = msgspec.structs.replace(settings, nats_url=restartable_nats.url)
    async with served_gateway(on_own_server) as url:
        yield url


class SessionManagerDouble:
    """Records every command; creates (or refuses) conversations the way session-manager does
    (log only) and stores settings in KV the way it does (a null API key keeps the stored one)."""

    def __init__(self, js: JetStreamContext, settings: KeyValue) -> None:
        self.appender = EventAppender(js)
        self.js = js
        self.settings = settings
        self.commands: list[AnyCommand] = []
        self.create_delay = 0.0
        self.ignore_creates = False
        self.reject_creates = False
        self.verdict_delay = 0.0
        self.settings_delay = 0.0
        self.ignore_settings = False

    async def on_command(self, msg: Msg) -> None:
        command = decode_command(msg.data)
        self.commands.append(command)
        if isinstance(command, CreateConversation) and not self.ignore_creates:
            await asyncio.sleep(self.create_delay)
            if self.reject_creates:
                await self.reject(command.user_id, command.conversation_id)
            else:
                await self.create(command.user_id, command.conversation_id, command.spec.title)
        if isinstance(command, UpdateSettings) and not self.ignore_settings:
            await asyncio.sleep(self.settings_delay)
            await self.store_settings(command.user_id, command.settings)
        if isinstance(command, ConversationCommand) and command.command_id is not None:
            await asyncio.sleep(self.verdict_delay)
            await self.accept(command, command.command_id)

    async def accept(self, command: ConversationCommand, command_id: str) -> None:
        """Answer as session-manager answers a command it accepts (the transition table is
        session-manager's, tested there and end to end)."""
        verdict = CommandVerdict(
            command_id=command_id,
            conversation_id=command.conversation_id,
            accepted=True,
            status=ConversationStatus.STARTING,
        )
        kv = await self.js.key_value(subjects.VERDICTS_BUCKET)
        await kv.put(command_id, encode_verdict(verdict))

    async def store_settings(self, user_id: str, update: UserSettings) -> None:
        if update.llm_api_key is None:
            with contextlib.suppress(KeyNotFoundError):
                entry = await self.settings.get(user_id)
                stored = msgspec.json.decode(entry.value or b"{}", type=UserSettings)
                update = msgspec.structs.replace(update, llm_api_key=stored.llm_api_key)
        await self.settings.put(user_id, msgspec.json.encode(update))

    async def create(self, user_id: str, conversation_id: str, title: str | None = None) -> None:
        cid = conversation_id
        await self.appender.append_all(
            [
                ConversationCreated(
                    conversation_id=cid,
                    source=EventSource.USER,
                    user_id=user_id,
                    spec=ConversationSpec(title=title),
                    title=title or "untitled",
                ),
                ConversationStatusChanged(
                    conversation_id=cid,
                    source=EventSource.ENVIRONMENT,
                    status=ConversationStatus.STARTING,
                ),
            ]
        )

    async def reject(self, user_id: str, conversation_id: str) -> None:
        """Refuse as session-manager refuses a creation beyond the user's queue: the refusal is
        the conversation's only event."""
        await self.appender.append(
            ConversationRejected(
                conversation_id=conversation_id,
                source=EventSource.ENVIRONMENT,
                user_id=user_id,
                reason="queue_full",
                detail="you already have 1 conversation waiting",
            )
        )

    async def say(self, conversation_id: str, text: str) -> None:
        await self.appender.append(
            MessageAction(conversation_id=conversation_id, source=EventSource.AGENT, content=text)
        )


@pytest.fixture
async def settings_kv(js: JetStreamContext) -> KeyValue:
    """KV `taskbus_settings` with no settings stored for alice and bob (the server is shared)."""
    kv = await js.key_value(subjects.SETTINGS_BUCKET)
    for user in ("alice", "bob"):
        await kv.purge(user)
    return kv


@pytest.fixture
async def session_manager(
    nc: Client, js: JetStreamContext, settings_kv: KeyValue
) -> AsyncIterator[SessionManagerDouble]:
    double = SessionManagerDouble(js, settings_kv)
    subscription = await nc.subscribe(subjects.SESSION_MANAGER_COMMANDS, cb=double.on_command)
    yield double
    await subscription.unsubscribe()


class EventStoreDouble:
    """Answers queries straight from the log, enough to exercise the gateway's mapping."""

    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js
        self.queries: list[Any] = []
        self.analytics_error: QueryError | None = None

    async def events(self, conversation_id: str) -> list[bytes]:
        stored: list[bytes] = []
        seq = 1
        while True:
            try:
                message = await self._js.get_msg(
                    subjects.EVENTS_STREAM,
                    seq,
                    subject=subjects.conversation_events(conversation_id),
                    next=True,
                    direct=True,
                )
            except NotFoundError:
                return stored
            assert message.seq is not None and message.data is not None
            stored.append(message.data)
            seq = message.seq + 1

    async def on_search(self, msg: Msg) -> None:
        query = msgspec.json.decode(msg.data, type=SearchEvents)
        self.queries.append(query)
        events = (await self.events(query.conversation_id))[query.start_id :]
        page = EventPage(
            events=[msgspec.Raw(e) for e in events[: query.limit]],
            has_more=len(events) > query.limit,
            next_start_id=query.start_id + query.limit if len(events) > query.limit else None,
        )
        await msg.respond(msgspec.json.encode(page))

    async def on_get_event(self, msg: Msg) -> None:
        query = msgspec.json.decode(msg.data, type=GetEvent)
        self.queries.append(query)
        events = await self.events(query.conversation_id)
        reply: EventReply | QueryError
        if query.event_id < len(events):
            reply = EventReply(event=msgspec.Raw(events[query.event_id]))
        else:
            reply = QueryError(status=404, title="Not Found", detail="no such event")
        await msg.respond(msgspec.json.encode(reply))

    async def on_list(self, msg: Msg) -> None:
        query = msgspec.json.decode(msg.data, type=ListConversations)
        self.queries.append(query)
        await msg.respond(msgspec.json.encode(ConversationPage(conversations=[])))

    def analytics_responder(
        self, query_type: type[Query], report: Callable[[Any], Reply]
    ) -> Callable[[Msg], Awaitable[None]]:
        """Answers `report(query)`, or `analytics_error` when one is set."""

        async def respond(msg: Msg) -> None:
            query = msgspec.json.decode(msg.data, type=query_type)
            self.queries.append(query)
            reply = self.analytics_error or report(query)
            await msg.respond(msgspec.json.encode(reply))

        return respond


# Fixed analytics reports: the figures are event-store's business (tested there); the gateway
# must only pass them through.
FAILED_AT = datetime(2024, 5, 1, 12, tzinfo=UTC)
ANALYTICS_REPORTS: dict[type[Query], Callable[[Any], Reply]] = {
    CostAnalytics: lambda query: CostReport(
        group_by=query.group_by,
        buckets=[
            CostBucket(
                key="gpt-4o",
                cost=1.25,
                llm_calls=3,
                prompt_tokens=1000,
                completion_tokens=200,
                conversations=2,
            )
        ],
    ),
    DurationAnalytics: lambda _: DurationReport(
        outcomes=[
            OutcomeStats(
                status=ConversationStatus.FINISHED,
                conversations=2,
                mean_seconds=30.0,
                p50_seconds=30.0,
                p90_seconds=38.0,
                max_seconds=40.0,
            ),
            OutcomeStats(status=ConversationStatus.RUNNING, conversations=1),
        ]
    ),
    EventKindCounts: lambda _: EventKindReport(
        kinds=[KindCount(kind="MessageAction", events=4, conversations=2)]
    ),
    FailingCommands: lambda query: FailingCommandsReport(
        commands=[
            FailingCommand(
                command=f"pytest -k case{n}",
                failures=3 - n,
                runs=4,
                conversations=1,
                last_failed_at=FAILED_AT,
                last_exit_code=1,
            )
            for n in range(3)
        ][: query.limit]
    ),
}


@pytest.fixture
async def event_store(nc: Client, js: JetStreamContext) -> AsyncIterator[EventStoreDouble]:
    double = EventStoreDouble(nc, js)
    handlers: dict[type[Query], Callable[[Msg], Awaitable[None]]] = {
        SearchEvents: double.on_search,
        GetEvent: double.on_get_event,
        ListConversations: double.on_list,
    }
    for query_type, report in ANALYTICS_REPORTS.items():
        handlers[query_type] = double.analytics_responder(query_type, report)
    subscriptions = [
        await nc.subscribe(subjects.query_subject(query.subject_name), cb=handler)
        for query, handler in handlers.items()
    ]
    yield double
    for subscription in subscriptions:
        await subscription.unsubscribe()


StreamSequences = Callable[[], Awaitable[tuple[int, int]]]


@pytest.fixture
def stream_sequences(js: JetStreamContext) -> StreamSequences:
    """Last sequences of the command and event streams: they move iff something was published."""

    async def read() -> tuple[int, int]:
        commands = await js.stream_info(subjects.COMMANDS_STREAM)
        events = await js.stream_info(subjects.EVENTS_STREAM)
        return commands.state.last_seq, events.state.last_seq

    return read


@pytest.fixture
def bus(app: FastAPI) -> Bus:
    bus: Bus = app.state.bus
    return bus
