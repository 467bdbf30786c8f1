"""A small client of the public REST/WebSocket API, used by the CLI and the demo.

Where it talks to and with which key: `TASKBUS_URL` / `TASKBUS_API_KEY`, else the user's config
file (`$XDG_CONFIG_HOME/taskbus/config.toml`, by default `~/.config/taskbus/config.toml`, which
`taskbus up` writes), never a file relative to the current directory.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import msgspec
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from taskbus.contracts.status import SETTLED_STATUSES
from taskbus.contracts.wire import NULL_OBSERVATION

DEFAULT_URL = "http://127.0.0.1:3000"


class ClientConfig(msgspec.Struct, frozen=True, kw_only=True):
    url: str = DEFAULT_URL
    api_key: str | None = None
    # The data dir of the `taskbus up` that wrote the file: where `down` and `status` look.
    data_dir: str | None = None


def config_file(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "taskbus" / "config.toml"


def load_config(env: Mapping[str, str] = os.environ) -> ClientConfig:
    """The config file's values, each replaced by its environment variable when set."""
    path = config_file(env)
    stored: dict[str, Any] = {}
    if path.exists():
        try:
            stored = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise CliError(f"{path} is not valid TOML ({error}): fix or delete it") from None
    fields = {
        "url": env.get("TASKBUS_URL") or stored.get("url"),
        "api_key": env.get("TASKBUS_API_KEY") or stored.get("api_key"),
        "data_dir": stored.get("data_dir"),
    }
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v}, ClientConfig)
    except msgspec.ValidationError as error:
        raise CliError(f"{path}: {error}: fix or delete it") from None


def save_config(config: ClientConfig, env: Mapping[str, str] = os.environ) -> Path:
    """Written by `taskbus up` for its local stack (0600: it holds the API key)."""
    path = config_file(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by `taskbus up`: where the taskbus CLI finds the local stack."]
    # JSON strings are valid TOML basic strings.
    lines += [
        f"{key} = {json.dumps(value)}"
        for key, value in msgspec.structs.asdict(config).items()
        if value is not None
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("\n".join(lines) + "\n")
    return path


class CliError(Exception):
    """One line for the user: what went wrong and what to do next."""


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
            raise ApiError(response.status_code, _problem(response))
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

    async def delete_conversation(self, conversation_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._request(
            "DELETE", f"/api/conversations/{conversation_id}"
        )
        return result

    async def send_message(self, conversation_id: str, message: str) -> dict[str, Any]:
        path = f"/api/conversations/{conversation_id}/message"
        result: dict[str, Any] = await self._request("POST", path, json={"message": message})
        return result

    async def settings(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/api/settings")
        return result

    async def store_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("PUT", "/api/settings", json=settings)
        return result

    async def list_files(self, conversation_id: str, path: str = "") -> list[str]:
        result: list[str] = await self._request(
            "GET", f"/api/conversations/{conversation_id}/list-files", params={"path": path}
        )
        return result

    async def read_file(self, conversation_id: str, path: str) -> str:
        result = await self._request(
            "GET", f"/api/conversations/{conversation_id}/select-file", params={"file": path}
        )
        return str(result["code"])

    async def git_changes(self, conversation_id: str) -> list[dict[str, str]]:
        result: list[dict[str, str]] = await self._request(
            "GET", f"/api/conversations/{conversation_id}/git/changes"
        )
        return result

    async def git_diff(self, conversation_id: str, path: str) -> dict[str, str]:
        result: dict[str, str] = await self._request(
            "GET", f"/api/conversations/{conversation_id}/git/diff", params={"path": path}
        )
        return result

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
        try:
            async with connect(ws_url, additional_headers=self._headers) as ws:
                async for raw in ws:
                    message = json.loads(raw)
                    if message.get("kind") == "heartbeat":
                        continue
                    yield message
        except InvalidStatus as refused:
            # The handshake's refusal carries the same problem document as REST answers.
            response = refused.response
            try:
                problem = json.loads(response.body or b"{}")
            except ValueError:
                problem = {}
            raise ApiError(response.status_code, problem) from None


def _problem(response: httpx.Response) -> dict[str, Any]:
    """RFC 9457 problem details, or what stands in for them when a proxy answers."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    return {"title": response.reason_phrase, "detail": response.text[:200]}


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
