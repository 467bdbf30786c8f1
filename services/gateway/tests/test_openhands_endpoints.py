"""OpenHands' rename, add_event, trajectory and config endpoints, and the reply shapes of its
commands, against a real nats-server with stand-ins for session-manager and event-store."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest
from fastapi import FastAPI

from taskbus.contracts.commands import RenameConversation, SendMessage
from taskbus.contracts.events import EventSource, RuntimeStatus, RuntimeStatusChanged

from .test_rest import Headers, assert_problem, create


async def test_rename_sends_the_stripped_title_and_answers_true(
    client: httpx.AsyncClient, alice: Headers, bob: Headers, session_manager: Any
) -> None:
    cid = await create(client, alice)
    base = f"/api/conversations/{cid}"
    response = await client.patch(base, json={"title": "  Renamed  "}, headers=alice)
    assert response.status_code == 202, response.text
    assert response.json() is True  # OpenHands' frontend reads a boolean
    renamed = session_manager.commands[-1]
    assert isinstance(renamed, RenameConversation)
    assert (renamed.title, renamed.user_id, renamed.conversation_id) == ("Renamed", "alice", cid)
    assert_problem(await client.patch(base, json={"title": "x"}, headers=bob), 404)


@pytest.mark.parametrize(
    "body",
    [
        {},  # no title
        {"title": "   "},  # blank once stripped
        {"title": "x" * 201},  # OpenHands' limit is 200
        {"title": "ok", "colour": "red"},  # UpdateConversationRequest forbids extras
        {"title": 7},
    ],
)
async def test_invalid_renames_are_422_and_send_nothing(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any, body: dict[str, Any]
) -> None:
    cid = await create(client, alice)
    sent = len(session_manager.commands)
    response = await client.patch(f"/api/conversations/{cid}", json=body, headers=alice)
    assert_problem(response, 422)
    assert len(session_manager.commands) == sent


async def test_add_event_takes_a_user_message_as_send_message(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    cid = await create(client, alice)
    event = {
        "id": 3,
        "timestamp": "2025-01-01T00:00:00",
        "source": "user",
        "message": "hi",
        "action": "message",
        "args": {"content": "hi", "image_urls": [], "wait_for_response": False},
    }
    response = await client.post(f"/api/conversations/{cid}/events", json=event, headers=alice)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["success"] is True and body["status"] == "ok"
    assert body["conversation_id"] == cid and "taskbus_status" in body
    sent = session_manager.commands[-1]
    assert isinstance(sent, SendMessage) and (sent.content, sent.user_id) == ("hi", "alice")


@pytest.mark.parametrize(
    ("event", "says"),
    [
        ({"action": "run", "args": {"command": "rm -rf /"}}, "'run'"),
        ({"observation": "run", "content": "done", "extras": {}}, "observation 'run'"),
        ({"action": "message", "source": "agent", "args": {"content": "hi"}}, "agent"),
        ({"action": "message", "args": {"content": ""}}, "content"),
        ({"action": "message", "args": {}}, "content"),
        ({"action": "message", "args": {"content": "hi", "colour": "red"}}, "colour"),
        (
            {"action": "message", "args": {"content": "hi", "image_urls": ["https://x/a.png"]}},
            "image_urls",
        ),
        ({"content": "hi"}, "None"),
    ],
)
async def test_add_event_refuses_anything_but_a_user_message_and_says_why(
    client: httpx.AsyncClient,
    alice: Headers,
    session_manager: Any,
    event: dict[str, Any],
    says: str,
) -> None:
    cid = await create(client, alice)
    sent = len(session_manager.commands)
    response = await client.post(f"/api/conversations/{cid}/events", json=event, headers=alice)
    assert says in assert_problem(response, 422)["detail"]
    assert len(session_manager.commands) == sent


async def test_trajectory_is_every_event_in_order_across_pages(
    client: httpx.AsyncClient,
    alice: Headers,
    bob: Headers,
    session_manager: Any,
    event_store: Any,
) -> None:
    cid = await create(client, alice)
    for n in range(230):  # three pages of the event store's 100
        await session_manager.say(cid, f"line {n}")
    response = await client.get(f"/api/conversations/{cid}/trajectory", headers=alice)
    assert response.status_code == 200, response.text
    trajectory = response.json()["trajectory"]
    assert [event["id"] for event in trajectory] == list(range(232))
    assert trajectory[-1]["action"] == "message" and trajectory[-1]["args"]["content"] == (
        "line 229"
    )
    assert all("action" in event or "observation" in event for event in trajectory)
    assert [q.start_id for q in event_store.queries] == [0, 100, 200]
    assert_problem(await client.get(f"/api/conversations/{cid}/trajectory", headers=bob), 404)


async def test_a_trajectory_over_the_bound_is_413(
    app: FastAPI, client: httpx.AsyncClient, alice: Headers, session_manager: Any, event_store: Any
) -> None:
    cid = await create(client, alice)
    for n in range(150):
        await session_manager.say(cid, f"line {n}")
    app.state.settings = msgspec.structs.replace(app.state.settings, trajectory_max_bytes=20_000)
    response = await client.get(f"/api/conversations/{cid}/trajectory", headers=alice)
    problem = assert_problem(response, 413)
    assert problem["max_bytes"] == 20_000 and "/events" in problem["detail"]


async def test_config_names_the_sandbox_and_the_session(
    client: httpx.AsyncClient, alice: Headers, bob: Headers, session_manager: Any
) -> None:
    cid = await create(client, alice)
    config = f"/api/conversations/{cid}/config"
    assert (await client.get(config, headers=alice)).json() == {
        "runtime_id": None,
        "session_id": cid,
    }
    await session_manager.appender.append(
        RuntimeStatusChanged(
            conversation_id=cid,
            source=EventSource.ENVIRONMENT,
            status=RuntimeStatus.READY,
            sandbox_id="sbx-42",
        )
    )
    assert (await client.get(config, headers=alice)).json() == {
        "runtime_id": "sbx-42",
        "session_id": cid,
    }
    assert_problem(await client.get(config, headers=bob), 404)


@pytest.mark.parametrize("call", ["start", "stop", "delete"])
async def test_start_stop_and_delete_answer_openhands_conversation_response(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any, call: str
) -> None:
    cid = await create(client, alice)
    base = f"/api/conversations/{cid}"
    if call == "delete":
        response = await client.delete(base, headers=alice)
    else:
        response = await client.post(f"{base}/{call}", json={}, headers=alice)
    assert response.status_code == 202, response.text
    body = response.json()
    # OpenHands' ConversationResponse, then Taskbus' own fields alongside.
    assert {"status", "conversation_id", "message", "conversation_status"} <= body.keys()
    assert (body["status"], body["conversation_id"]) == ("ok", cid)
    assert body["conversation_status"] == "STARTING" and body["taskbus_status"] == "STARTING"
    assert isinstance(body["last_event_id"], int)
