"""A small client of the public REST/WebSocket API, used by the CLI and the demo."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import httpx
from websockets.asyncio.client import connect

from taskbus.contracts.status import SETTLED_STATUSES
from taskbus.contracts.wire import NULL_OBSERVATION


class ApiError(RuntimeError):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}")
        self.status = status
        self.problem = problem


class TaskbusClient:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=30)

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ApiError(response.status_code, response.json())
        return response.json()

    async def create_conversation(self, **spec: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("POST", "/api/conversations", json=spec)
        return result

    async def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", f"/api/conversations/{conversation_id}")
        return result

    async def list_conversations(self, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/api/conversations", params=params)
        return result

    async def search_events(self, conversation_id: str, **params: Any) -> dict[str, Any]:
        path = f"/api/conversations/{conversation_id}/events"
        result: dict[str, Any] = await self._request("GET", path, params=params)
        return result

    async def control(self, conversation_id: str, action: str) -> dict[str, Any]:
        """The answer to an accepted command; ApiError (409 and why) for a refused one."""
        path = f"/api/conversations/{conversation_id}/{action}"
        result: dict[str, Any] = await self._request("POST", path)
        return result

    async def send_message(self, conversation_id: str, message: str) -> None:
        path = f"/api/conversations/{conversation_id}/message"
        await self._request("POST", path, json={"message": message})

    async def follow(
        self, conversation_id: str, after_id: int = -1
    ) -> AsyncIterator[dict[str, Any]]:
        """Events over the WebSocket, replayed from after_id + 1 and then live."""
        url = urlparse(self.base_url)
        scheme = "wss" if url.scheme == "https" else "ws"
        ws_url = (
            f"{scheme}://{url.netloc}/api/conversations/{conversation_id}/events"
            f"?after_id={after_id}"
        )
        async with connect(ws_url, additional_headers=self._headers) as ws:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("kind") == "heartbeat":
                    continue
                yield message


def is_final_status_event(event: dict[str, Any]) -> bool:
    # Wire statuses are the enum values, so the contracts' set matches them as strings.
    return bool(
        event.get("kind") == "ConversationStatusChanged" and event.get("status") in SETTLED_STATUSES
    )


def render_event(event: dict[str, Any]) -> str:
    """One line per event for terminals: id, source, kind and the gist."""
    kind = event.get("kind", "?")
    gist = " ".join(_gist(kind, event).split())
    if len(gist) > 110:
        gist = gist[:107] + "..."
    return f"{event.get('id', '?'):>4} {event.get('source', ''):<11} {kind:<26} {gist}"


def _gist(kind: str, event: dict[str, Any]) -> str:
    """Taskbus' own fields first: status, runtime and metrics events are OpenHands' no-op
    `null` observation on the wire, whose content says less than they do."""
    if kind == "ToolCallsQueued":
        calls = event.get("calls", [])
        return f"{len(calls)} tool calls, run in turn: " + ", ".join(c["name"] for c in calls)
    if kind == "LLMMetrics":
        return (
            f"{event.get('model')} {event.get('prompt_tokens')}+{event.get('completion_tokens')}"
            f" tokens ${event.get('cost', 0):.6f} (total ${event.get('accumulated_cost', 0):.6f})"
        )
    if "args" in event:
        args = event["args"]
        if kind == "TaskTrackingAction":
            return ", ".join(f"{t['title']} [{t['status']}]" for t in args.get("task_list", []))
        if kind == "FileEditAction":
            return f"{args.get('command')} {args.get('path')}"
        return str(
            args.get("command")
            or args.get("content")
            or args.get("thought")
            or args.get("final_thought")
            or ""
        )
    if event.get("observation") not in (None, NULL_OBSERVATION):
        extras = event.get("extras", {})
        content = str(event.get("content") or "")
        if kind == "CmdOutputObservation":
            return f"exit {extras.get('exit_code')}: {content}"
        return content
    return " ".join(
        str(event[key])
        for key in ("status", "agent_state", "title", "reason", "content")
        if event.get(key)
    )
