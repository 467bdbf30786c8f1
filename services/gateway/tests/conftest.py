"""Gateway fixtures: the app over a real nats-server, and minimal stand-ins for session-manager
(appends ConversationCreated when asked) and event-store (answers queries from the log)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskbus.contracts import subjects
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.commands import AnyCommand, CreateConversation, decode_command
from taskbus.contracts.events import (
    ConversationCreated,
    ConversationStatusChanged,
    EventSource,
    MessageAction,
)
from taskbus.contracts.queries import (
    ConversationPage,
    EventPage,
    EventReply,
    GetEvent,
    ListConversations,
    Query,
    QueryError,
    SearchEvents,
)
from taskbus.contracts.specs import ConversationSpec
from taskbus.contracts.status import ConversationStatus
from taskbus.devtools.nats_server import free_port
from taskbus.gateway.app import create_app
from taskbus.gateway.bus import Bus
from taskbus.gateway.settings import GatewaySettings

ALICE_KEY, BOB_KEY = "alice-secret-key", "bob-secret-key"


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


@pytest.fixture
async def server_url(settings: GatewaySettings) -> AsyncIterator[str]:
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
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    await task


class SessionManagerDouble:
    """Records every command; creates conversations the way session-manager does (log only)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.appender = EventAppender(js)
        self.commands: list[AnyCommand] = []
        self.create_delay = 0.0
        self.ignore_creates = False

    async def on_command(self, msg: Msg) -> None:
        command = decode_command(msg.data)
        self.commands.append(command)
        if isinstance(command, CreateConversation) and not self.ignore_creates:
            await asyncio.sleep(self.create_delay)
            await self.create(command.user_id, command.conversation_id, command.spec.title)

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

    async def say(self, conversation_id: str, text: str) -> None:
        await self.appender.append(
            MessageAction(conversation_id=conversation_id, source=EventSource.AGENT, content=text)
        )


@pytest.fixture
async def session_manager(nc: Client, js: JetStreamContext) -> AsyncIterator[SessionManagerDouble]:
    double = SessionManagerDouble(js)
    subscription = await nc.subscribe(subjects.SESSION_MANAGER_COMMANDS, cb=double.on_command)
    yield double
    await subscription.unsubscribe()


class EventStoreDouble:
    """Answers queries straight from the log, enough to exercise the gateway's mapping."""

    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js
        self.queries: list[Any] = []

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


@pytest.fixture
async def event_store(nc: Client, js: JetStreamContext) -> AsyncIterator[EventStoreDouble]:
    double = EventStoreDouble(nc, js)
    handlers: dict[type[Query], Callable[[Msg], Awaitable[None]]] = {
        SearchEvents: double.on_search,
        GetEvent: double.on_get_event,
        ListConversations: double.on_list,
    }
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
