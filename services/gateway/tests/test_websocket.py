"""WS /api/conversations/{id}/events (and the event tail under it) over a real uvicorn server
and a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from taskbus.contracts.appender import EventAppender
from taskbus.contracts.commands import ConfirmAction, PauseConversation, SendMessage
from taskbus.contracts.events import CmdOutputChunk, ConversationCreated, EventSource, MessageAction
from taskbus.contracts.specs import ConversationSpec
from taskbus.devtools.nats_server import NatsServer
from taskbus.gateway.bus import Bus
from taskbus.gateway.event_tail import EventTail

Headers = dict[str, str]


def events_url(server_url: str, cid: str, query: str = "") -> str:
    return f"ws://{server_url}/api/conversations/{cid}/events{query}"


async def next_event(ws: ClientConnection, wait_seconds: float = 5.0) -> dict[str, Any]:
    """The next event, skipping heartbeats."""
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), wait_seconds))
        if message.get("kind") != "heartbeat":
            return message


async def no_event_within(ws: ClientConnection, seconds: float) -> bool:
    try:
        await next_event(ws, wait_seconds=seconds)
    except TimeoutError:
        return True
    return False


async def conversation_with_history(session_manager: Any, user: str, messages: int) -> str:
    """A conversation whose events interleave in the stream with another conversation's."""
    cid, other = uuid.uuid4().hex, uuid.uuid4().hex
    await session_manager.create(user, cid)
    await session_manager.create(user, other)
    for i in range(messages):
        await session_manager.say(cid, f"m{i}")
        await session_manager.say(other, f"other {i}")
    return cid


async def test_replay_after_id_then_live_then_reconnect_without_gap_or_duplicate(
    server_url: str, alice: Headers, session_manager: Any
) -> None:
    cid = await conversation_with_history(session_manager, "alice", messages=8)  # ids 0..9
    url = events_url(server_url, cid, "?after_id=4")
    async with connect(url, additional_headers=alice) as ws:
        replayed = [await next_event(ws) for _ in range(5)]
        assert [e["id"] for e in replayed] == [5, 6, 7, 8, 9]
        assert replayed[0]["action"] == "message" and replayed[0]["message"] == "m3"
        for i in range(3):
            await session_manager.say(cid, f"live {i}")
        live = [await next_event(ws) for _ in range(3)]
        assert [(e["id"], e["message"]) for e in live] == [
            (10, "live 0"),
            (11, "live 1"),
            (12, "live 2"),
        ]
        assert await no_event_within(ws, 0.3)
    await session_manager.say(cid, "while away")  # id 13
    async with connect(events_url(server_url, cid, "?after_id=12"), additional_headers=alice) as ws:
        assert (await next_event(ws))["id"] == 13
        await session_manager.say(cid, "back")
        assert (await next_event(ws))["id"] == 14
        assert await no_event_within(ws, 0.3)


async def test_without_after_id_everything_is_replayed(
    server_url: str, alice: Headers, session_manager: Any
) -> None:
    cid = await conversation_with_history(session_manager, "alice", messages=3)
    async with connect(events_url(server_url, cid), additional_headers=alice) as ws:
        kinds = [(await next_event(ws))["kind"] for _ in range(5)]
    assert kinds == [
        "ConversationCreated",
        "ConversationStatusChanged",
        "MessageAction",
        "MessageAction",
        "MessageAction",
    ]


async def test_after_the_last_id_only_new_events_come(
    server_url: str, alice: Headers, session_manager: Any
) -> None:
    cid = await conversation_with_history(session_manager, "alice", messages=2)  # ids 0..3
    async with connect(events_url(server_url, cid, "?after_id=3"), additional_headers=alice) as ws:
        assert await no_event_within(ws, 0.3)
        await session_manager.say(cid, "next")
        assert (await next_event(ws))["id"] == 4


async def test_idle_connection_gets_heartbeats(
    server_url: str, alice: Headers, session_manager: Any
) -> None:
    cid = await conversation_with_history(session_manager, "alice", messages=0)
    async with connect(events_url(server_url, cid, "?after_id=1"), additional_headers=alice) as ws:
        message = json.loads(await asyncio.wait_for(ws.recv(), 2))
    assert message == {"kind": "heartbeat"}


async def test_handshake_is_refused_without_key_or_for_another_users_conversation(
    server_url: str, alice: Headers, bob: Headers, session_manager: Any
) -> None:
    cid = await conversation_with_history(session_manager, "alice", messages=0)
    refusals = [
        ({}, "", 401),
        ({"Authorization": "Bearer nope"}, "", 401),
        (bob, "", 404),
        (alice, "", None),
    ]
    for headers, query, status in refusals:
        if status is None:
            async with connect(events_url(server_url, cid, query), additional_headers=headers):
                pass
            continue
        with pytest.raises(InvalidStatus) as refused:
            async with connect(events_url(server_url, cid, query), additional_headers=headers):
                pass
        assert refused.value.response.status_code == status
        assert json.loads(refused.value.response.body or b"{}")["status"] == status


async def test_api_key_query_parameter_authenticates_browsers(
    server_url: str, session_manager: Any
) -> None:
    cid = await conversation_with_history(session_manager, "alice", messages=0)
    async with connect(events_url(server_url, cid, "?api_key=alice-secret-key")) as ws:
        assert (await next_event(ws))["id"] == 0


async def test_client_actions_become_commands_and_bad_ones_get_typed_errors(
    server_url: str, alice: Headers, session_manager: Any
) -> None:
    cid = await conversation_with_history(session_manager, "alice", messages=0)
    async with connect(events_url(server_url, cid, "?after_id=1"), additional_headers=alice) as ws:
        for bad in ("not json", '{"action": "dance"}', '{"action": "message"}'):
            await ws.send(bad)
            error = await next_event(ws)
            assert error["kind"] == "error" and error["code"] == "invalid_message"
        await ws.send('{"action": "message", "message": "hi"}')
        await ws.send('{"action": "pause"}')
        await ws.send('{"action": "confirm"}')
        for _ in range(100):
            if len(session_manager.commands) == 3:
                break
            await asyncio.sleep(0.02)
    message, pause, confirm = session_manager.commands
    assert isinstance(message, SendMessage) and message.content == "hi"
    assert isinstance(pause, PauseConversation) and pause.conversation_id == cid
    assert isinstance(confirm, ConfirmAction) and confirm.confirmed and confirm.user_id == "alice"


@contextlib.asynccontextmanager
async def appender_on(nats_url: str) -> AsyncIterator[EventAppender]:
    """An appender on a connection of its own (the gateway's is the one under test)."""
    connection = await nats.connect(nats_url)
    try:
        yield EventAppender(connection.jetstream())
    finally:
        await connection.drain()


def said(cid: str, text: str) -> MessageAction:
    return MessageAction(conversation_id=cid, source=EventSource.AGENT, content=text)


async def alices_conversation(nats_url: str, events: list[MessageAction | CmdOutputChunk]) -> str:
    cid = uuid.uuid4().hex
    created = ConversationCreated(
        conversation_id=cid,
        source=EventSource.USER,
        user_id="alice",
        spec=ConversationSpec(),
        title="restart",
    )
    async with appender_on(nats_url) as appender:
        await appender.append(created)
        for event in events:
            await appender.append(msgspec.structs.replace(event, conversation_id=cid))
    return cid


async def restart(server: NatsServer) -> None:
    """Stop and start on the same port and store, off the event loop the gateway runs on."""
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(0.3)  # the gateway notices the lost connection
    await asyncio.to_thread(server.start)


async def test_an_open_websocket_resumes_promptly_after_nats_restarts(
    restartable_server_url: str, restartable_nats: NatsServer, alice: Headers
) -> None:
    """JetStream forgets the tail's consumer when nats-server restarts; events appended after
    the restart must still reach the open socket within a few seconds, gap- and dup-free."""
    history = [said("", f"before {i}") for i in range(2)]
    cid = await alices_conversation(restartable_nats.url, history)
    async with connect(events_url(restartable_server_url, cid), additional_headers=alice) as ws:
        assert [(await next_event(ws))["id"] for _ in range(3)] == [0, 1, 2]
        await restart(restartable_nats)
        restarted_at = time.monotonic()
        async with appender_on(restartable_nats.url) as appender:
            await appender.append_all([said(cid, f"after {i}") for i in range(3)])
        after = [await next_event(ws, wait_seconds=10) for _ in range(3)]
        latency = time.monotonic() - restarted_at
        assert [(e["id"], e["message"]) for e in after] == [
            (3, "after 0"),
            (4, "after 1"),
            (5, "after 2"),
        ]
        # nats-py alone rebuilds the consumer only after two missed heartbeats (~20 s).
        assert latency < 10, f"events after the restart took {latency:.1f}s"
        assert await no_event_within(ws, 0.5)


async def test_a_tail_waiting_for_its_reader_through_a_nats_restart_loses_no_event(
    restartable_nats: NatsServer,
) -> None:
    """The restart finds the tail waiting for a slow reader to take the next history event;
    the re-created consumer must deliver that event, once."""
    bus = await Bus.connect(restartable_nats.url, wait_seconds=2.0)  # makes the streams
    try:
        history = [said("", f"before {i}") for i in range(20)]
        cid = await alices_conversation(restartable_nats.url, history)  # ids 0..20
        async with EventTail(bus.js, bus.reconnects, cid, after_id=-1, max_buffered=5) as tail:
            await asyncio.sleep(0.2)  # ids 0..4 fill the buffer; the tail waits to put id 5
            await restart(restartable_nats)
            await asyncio.wait_for(bus.reconnects.after(0), 5)
            await asyncio.sleep(0.2)  # the tail resumes while still waiting to put id 5
            history_taken = [await tail.next_event(wait_seconds=3) for _ in range(21)]
            assert [item[0] if item else None for item in history_taken] == list(range(21))
            async with appender_on(restartable_nats.url) as appender:
                await appender.append(said(cid, "after"))
            live = await tail.next_event(wait_seconds=3)
            assert live is not None and live[0] == 21
            assert await tail.next_event(wait_seconds=0.5) is None
    finally:
        await bus.close()


_BURST_WRITER = """
import asyncio, sys
import nats
from taskbus.contracts.appender import EventAppender
from taskbus.contracts.events import CmdOutputChunk, EventSource

async def main(url, cid, count):
    nc = await nats.connect(url)
    appender = EventAppender(nc.jetstream())
    for start in range(0, count, 100):
        await appender.append_all([
            CmdOutputChunk(
                conversation_id=cid, source=EventSource.ENVIRONMENT, content=f"{n:06d}" * 250
            )
            for n in range(start, start + 100)
        ])
    await nc.drain()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""
BURST = 10_000


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait (60 s at most) until a log record says `text`."""
    deadline = time.monotonic() + 60
    while not any(text in record.getMessage() for record in caplog.records):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing logged {text!r}")
        await asyncio.sleep(0.05)


async def ids_until(ws: ClientConnection, last_id: int | None) -> tuple[list[int], int | None]:
    """Event ids read until `last_id` arrives (None: until the server closes), and the close
    code if the server closed."""
    ids: list[int] = []
    try:
        while last_id is None or not ids or ids[-1] < last_id:
            ids.append((await next_event(ws, wait_seconds=60))["id"])
    except ConnectionClosed as closed:
        return ids, closed.rcvd.code if closed.rcvd else None
    return ids, None


async def test_a_slow_client_in_a_10k_event_burst_is_dropped_and_resumes_others_unaffected(
    default_buffer_server_url: str,
    nats_url: str,
    alice: Headers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A burst written by another process, as session-manager or the runner writes. The slow
    client reads nothing (a small receive buffer, one queued frame) until the gateway has
    decided to drop it, so it is slow however loaded the machine; then it reads to the close:
    4008 after a gap-free prefix, and it resumes by after_id. The two clients that read keep
    their sockets and get every event in order (the default buffer of 1000)."""
    caplog.set_level(logging.INFO, logger="taskbus.gateway.websocket")
    cid = await alices_conversation(nats_url, [said("", "tails open")])  # ids 0, 1
    last_id = 1 + BURST
    server_url = default_buffer_server_url
    url = events_url(server_url, cid, "?after_id=0")
    host, port = server_url.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)
    sock.connect((host, int(port)))
    async with (
        connect(url, sock=sock, additional_headers=alice, max_queue=1, compression=None) as slow,
        connect(url, additional_headers=alice, compression=None) as reader,
        connect(url, additional_headers=alice, compression=None) as other_reader,
    ):
        # Each got id 1, so each tail is open: the whole burst is live, none of it history.
        for ws in (slow, reader, other_reader):
            assert (await next_event(ws, wait_seconds=60))["id"] == 1
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BURST_WRITER, nats_url, cid, str(BURST)
        )

        async def read_once_dropped() -> tuple[list[int], int | None]:
            # Read from when the gateway gives up on it, well within CLOSE_SECONDS, so the
            # close frame queued behind what was already sent reaches it.
            await logged(caplog, "closing a slow WebSocket client")
            return await ids_until(slow, None)

        (
            (read, read_closed),
            (other, other_closed),
            (slow_ids, slow_closed),
            exit_code,
        ) = await asyncio.gather(
            ids_until(reader, last_id),
            ids_until(other_reader, last_id),
            read_once_dropped(),
            writer.wait(),
        )
    assert exit_code == 0
    assert (read_closed, other_closed) == (None, None)
    assert read == other == list(range(2, last_id + 1))
    assert slow_closed == 4008
    assert slow_ids == list(range(2, len(slow_ids) + 2))
    assert len(slow_ids) < BURST / 2  # cut off where its buffers filled, not after the burst
    resumed_at = slow_ids[-1] if slow_ids else 1
    # Resumed where it was cut off: the next events follow on without a gap (the readers
    # above show that none is lost).
    resume = events_url(server_url, cid, f"?after_id={resumed_at}")
    async with connect(resume, additional_headers=alice, compression=None) as again:
        rest, closed = await ids_until(again, resumed_at + 100)
    assert closed is None
    assert rest == list(range(resumed_at + 1, resumed_at + 101))
