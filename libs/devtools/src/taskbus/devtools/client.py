"""A small client of the public REST/WebSocket API, used by the CLI and the demo."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import httpx
from websockets.asyncio.client import connect

FINAL_STATUSES = frozenset({"FINISHED", "ERROR", "STOPPED", "ARCHIVED"})


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

    async def control(self, conversation_id: str, action: str) -> None:
        await self._request("POST", f"/api/conversations/{conversation_id}/{action}")

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
    return bool(
        event.get("kind") == "ConversationStatusChanged" and event.get("status") in FINAL_STATUSES
    )


def render_event(event: dict[str, Any]) -> str:
    """One line per event for terminals: id, source, kind and the gist."""
    kind = event.get("kind", "?")
    if "args" in event:
        args = event["args"]
        gist = (
            args.get("command")
            or args.get("content")
            or args.get("thought")
            or args.get("final_thought")
            or ""
        )
        if kind == "TaskTrackingAction":
            gist = ", ".join(f"{t['title']} [{t['status']}]" for t in args.get("task_list", []))
        elif kind == "FileEditAction":
            gist = f"{args.get('command')} {args.get('path')}"
    elif "observation" in event:
        extras = event.get("extras", {})
        gist = event.get("content") or " ".join(
            str(extras[key]) for key in ("agent_state", "reason") if extras.get(key)
        )
        if kind == "CmdOutputObservation":
            gist = f"exit {extras.get('exit_code')}: {gist}"
    elif kind == "ToolCallsQueued":
        calls = event.get("calls", [])
        gist = f"{len(calls)} tool calls, run in turn: " + ", ".join(c["name"] for c in calls)
    elif kind == "LLMMetrics":
        gist = (
            f"{event.get('model')} {event.get('prompt_tokens')}+{event.get('completion_tokens')}"
            f" tokens ${event.get('cost', 0):.6f} (total ${event.get('accumulated_cost', 0):.6f})"
        )
    else:
        gist = " ".join(
            str(event[key])
            for key in ("status", "agent_state", "title", "reason", "content")
            if event.get(key)
        )
    gist = " ".join(str(gist).split())
    if len(gist) > 110:
        gist = gist[:107] + "..."
    return f"{event.get('id', '?'):>4} {event.get('source', ''):<11} {kind:<26} {gist}"
