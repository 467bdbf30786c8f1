"""`WS /api/conversations/{id}/events?after_id=N`: replay after N, then the live log.

Authentication: the `Authorization: Bearer <key>` header, or `?api_key=<key>` for browsers,
which cannot set headers on a WebSocket. Server → client text messages: each event's wire
JSON; `{"kind": "heartbeat"}` when idle; `{"kind": "error", "code", "detail"}` for a rejected
client message or a refused command (`"code": "command_refused"` with `conversation_status`
and `reason`, as the REST 409). Client → server: `{"action": "message", "message": "..."}`, or
`{"action": "pause" | "resume" | "stop" | "confirm" | "reject"}`; an accepted one shows as its
events. A client that falls more than `ws_max_buffered_events` behind the live
log and stays there for 3 s (`event_tail.SLOW_READER_SECONDS`) is closed with code 4008
("slow consumer"): it reconnects with `after_id` = the last id it got and
resumes gap-free; the other clients are not held up. Its close frame comes after what was
already sent to it; a client that reads nothing for `CLOSE_SECONDS` more is cut off.
After a ConversationDeleted the socket is closed (1000); a deleted conversation's socket is
refused with 404 like its other reads. A user holding `ws_max_per_user` open WebSockets (per
gateway process) is refused the next handshake with a 429 problem (or close code 1008 where the
server cannot answer HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Query, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from taskbus.contracts.events import ConversationDeleted
from taskbus.contracts.wire import to_wire
from taskbus.gateway.auth import ApiKeys
from taskbus.gateway.bus import Bus
from taskbus.gateway.dependencies import BusDep, SettingsDep, WebSocketLimitDep, get_api_keys
from taskbus.gateway.event_tail import EventTail
from taskbus.gateway.inputs import command_for_action, decode_client_action
from taskbus.gateway.problems import PROBLEM_MEDIA_TYPE, Problem, unauthorized
from taskbus.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api")

SLOW_CONSUMER_CLOSE_CODE = 4008
# How long a close may wait for a client to read what is ahead of the close frame.
CLOSE_SECONDS = 10.0
_HEARTBEAT = msgspec.json.encode({"kind": "heartbeat"}).decode()


class _Kind(msgspec.Struct):
    kind: str = ""


_kind_decoder = msgspec.json.Decoder(_Kind)


class _Connection:
    """One authorised client: event sending and command receiving share its socket."""

    def __init__(self, websocket: WebSocket, bus: Bus, user_id: str, conversation_id: str) -> None:
        self._websocket = websocket
        self._bus = bus
        self._user_id = user_id
        self._conversation_id = conversation_id
        self._send_lock = asyncio.Lock()

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self._websocket.send_text(text)

    async def send_events(self, tail: EventTail, heartbeat_seconds: float) -> None:
        """Until the conversation is deleted: its ConversationDeleted is the last event sent."""
        while True:
            item = await tail.next_event(heartbeat_seconds)
            if item is None:
                await self.send(_HEARTBEAT)
                continue
            _, stored = item
            await self.send(msgspec.json.encode(to_wire(stored)).decode())
            if _kind_decoder.decode(stored).kind == ConversationDeleted.__name__:
                return

    async def receive_actions(self) -> None:
        """Turn client messages into commands until the client goes away."""
        while True:
            message = await self._websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text") or message.get("bytes") or b""
            await self._act_on(raw)

    async def _act_on(self, raw: str | bytes) -> None:
        try:
            action = decode_client_action(raw)
            command = command_for_action(action, self._user_id, self._conversation_id)
        except msgspec.DecodeError as error:
            await self._send_error("invalid_message", str(error))
            return
        try:
            await self._bus.send_command(command, uuid.uuid4().hex, fresh_id=True)
        except Problem as problem:
            # e.g. command-refused, with the conversation's status; service-unavailable
            code = problem.type.rpartition(":")[2].replace("-", "_")
            await self._send_error(code, problem.detail, **problem.extensions)

    async def _send_error(self, code: str, detail: str, **extensions: Any) -> None:
        error = {"kind": "error", "code": code, "detail": detail, **extensions}
        await self.send(msgspec.json.encode(error).decode())


async def _deny(websocket: WebSocket, problem: Problem) -> None:
    """Refuse the handshake with the problem as an HTTP answer where the server allows it."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        response = JSONResponse(
            problem.body(websocket.url.path),
            status_code=problem.status,
            media_type=PROBLEM_MEDIA_TYPE,
            headers=problem.headers,
        )
        await websocket.send_denial_response(response)
    else:
        await websocket.close(code=1008, reason=problem.title)


@router.websocket("/conversations/{conversation_id}/events")
async def conversation_events(
    websocket: WebSocket,
    conversation_id: str,
    bus: BusDep,
    api_keys: Annotated[ApiKeys, Depends(get_api_keys)],
    settings: SettingsDep,
    websocket_limit: WebSocketLimitDep,
    after_id: Annotated[int, Query(ge=-1, description="replay events with id > after_id")] = -1,
    api_key: Annotated[str | None, Query(description="for clients that cannot set headers")] = None,
) -> None:
    user = api_keys.user_for_authorization(websocket.headers.get("authorization"))
    if user is None and api_key:
        user = api_keys.user_for_key(api_key)
    if user is None:
        await _deny(websocket, unauthorized())
        return
    try:
        await bus.owned_conversation(user, conversation_id)
    except Problem as problem:
        await _deny(websocket, problem)
        return
    if not websocket_limit.acquire(user):
        await _deny(websocket, too_many_websockets(websocket_limit.maximum))
        return
    try:
        await _serve(websocket, bus, settings, user, conversation_id, after_id)
    finally:
        websocket_limit.release(user)


def too_many_websockets(maximum: int) -> Problem:
    return Problem(
        429,
        f"you already hold {maximum} open WebSockets, the most one user may; close one first",
        kind="too-many-websockets",
        title="Too many WebSockets",
        max_websockets=maximum,
    )


async def _serve(
    websocket: WebSocket,
    bus: Bus,
    settings: GatewaySettings,
    user: str,
    conversation_id: str,
    after_id: int,
) -> None:
    """Replay and tail the log to an authorised client while taking its actions."""
    await websocket.accept()
    connection = _Connection(websocket, bus, user, conversation_id)
    tail = EventTail(
        bus.js, bus.reconnects, conversation_id, after_id, settings.ws_max_buffered_events
    )
    async with tail:
        tasks: dict[str, asyncio.Task[Any]] = {
            "send": asyncio.create_task(
                connection.send_events(tail, settings.ws_heartbeat_seconds)
            ),
            "receive": asyncio.create_task(connection.receive_actions()),
            "overflow": asyncio.create_task(tail.overflowed.wait()),
        }
        try:
            done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
            deleted = tasks["send"] in done and tasks["send"].exception() is None
            for task in done:
                error = task.exception()
                if error is not None and not isinstance(error, WebSocketDisconnect):
                    logger.warning("WebSocket of %s ended by %r", conversation_id, error)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
    if tail.overflowed.is_set():
        logger.info("closing a slow WebSocket client of conversation %s", conversation_id)
        await _close(websocket, SLOW_CONSUMER_CLOSE_CODE, "slow consumer")
    elif deleted:
        await _close(websocket, 1000, "conversation deleted")


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    """Close, waiting at most CLOSE_SECONDS: a client that does not read holds the close frame
    back (the server sends nothing past a full socket) and must not hold the handler too."""
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, TimeoutError):
        async with asyncio.timeout(CLOSE_SECONDS):
            await websocket.close(code=code, reason=reason)
