"""Reading a conversation through the public API, as clients do: the WebSocket and GET /events."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from taskbus.contracts.status import ENDED_STATUSES

from .conftest import Stack

# Statuses ending a run (wire statuses are the enum values, so they match as strings).
FINAL = ENDED_STATUSES
EVENT_WAIT_SECONDS = 60


async def next_event(ws: ClientConnection) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), EVENT_WAIT_SECONDS))
        if message.get("kind") != "heartbeat":
            return message


async def events_until_final(ws: ClientConnection) -> list[dict[str, Any]]:
    events = []
    while True:
        event = await next_event(ws)
        events.append(event)
        if event.get("kind") == "ConversationStatusChanged" and event["status"] in FINAL:
            return events


def open_events_ws(stack: Stack, conversation_id: str, after_id: int) -> connect:
    return connect(
        f"{stack.ws_url}/api/conversations/{conversation_id}/events?after_id={after_id}",
        additional_headers=stack.headers,
    )


async def all_events_via_rest(
    client: httpx.AsyncClient, conversation_id: str
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    start_id = 0
    while True:
        response = await client.get(
            f"/api/conversations/{conversation_id}/events",
            params={"start_id": start_id, "limit": 7},
        )
        assert response.status_code == 200, response.text
        page = response.json()
        events.extend(page["events"])
        if not page["has_more"]:
            return events
        start_id = page["next_start_id"]


async def rest_events_when_projected(
    client: httpx.AsyncClient, conversation_id: str, expected: int
) -> list[dict[str, Any]]:
    """The projection trails the log by a batch; wait until it has caught up."""
    deadline = time.monotonic() + 30
    while True:
        events = await all_events_via_rest(client, conversation_id)
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.2)


async def metrics_texts(client: httpx.AsyncClient) -> dict[str, str]:
    """Every process's /metrics as Prometheus text: the gateway's route and each service's
    listener (its port from /api/health)."""
    scraped = {"gateway": (await client.get("/metrics")).text}
    health = await client.get("/api/health")
    assert health.status_code == 200, health.text
    for service, readiness in health.json()["services"].items():
        ports = [i["metrics_port"] for i in readiness["instances"] if i["ready"]]
        assert ports and ports[0] > 0, (service, readiness)
        async with httpx.AsyncClient() as plain:
            scraped[service] = (await plain.get(f"http://127.0.0.1:{ports[0]}/metrics")).text
    return scraped
