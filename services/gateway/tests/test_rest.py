"""The REST API against a real nats-server, with stand-ins for session-manager and event-store."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from taskbus.contracts.commands import (
    CreateConversation,
    PauseConversation,
    SendMessage,
    StopConversation,
)
from taskbus.contracts.queries import SearchEvents

Headers = dict[str, str]
StreamSequences = Callable[[], Awaitable[tuple[int, int]]]
PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail", "instance"} <= body.keys()
    return body


async def create(client: httpx.AsyncClient, headers: Headers, **spec: Any) -> str:
    response = await client.post("/api/conversations", json=spec, headers=headers)
    assert response.status_code == 201, response.text
    cid: str = response.json()["conversation_id"]
    return cid


async def test_health_needs_no_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/health")
    assert response.json() == {"status": "ok", "nats": True}


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", "Basic alice-secret-key", "Bearer"]
)
async def test_requests_without_a_valid_key_are_401(
    client: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.get("/api/conversations/abc", headers=headers)
    body = assert_problem(response, 401)
    assert "secret" not in response.text
    assert body["instance"] == "/api/conversations/abc"


async def test_post_answers_once_visible_and_get_finds_it(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    session_manager.create_delay = 0.2  # the answer must wait for the log, not race it
    response = await client.post(
        "/api/conversations",
        json={"initial_user_msg": "fix the bug", "title": "Bug", "priority": 3},
        headers=alice,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    cid = body["conversation_id"]
    assert body["status"] == "ok"
    assert body["conversation_status"] == "STARTING"
    assert response.headers["location"] == f"/api/conversations/{cid}"
    (command,) = session_manager.commands
    assert isinstance(command, CreateConversation)
    assert command.user_id == "alice" and command.spec.initial_user_msg == "fix the bug"

    got = await client.get(f"/api/conversations/{cid}", headers=alice)
    assert got.status_code == 200
    view = got.json()
    assert view["conversation_id"] == cid
    assert view["title"] == "Bug"
    assert view["status"] == "STARTING"
    assert view["last_event_id"] == 1 and view["event_count"] == 2
    assert "user_id" not in view


async def test_idempotency_key_retry_returns_the_same_conversation(
    client: httpx.AsyncClient, alice: Headers, bob: Headers, session_manager: Any
) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = await client.post("/api/conversations", json={}, headers=alice | key)
    again = await client.post("/api/conversations", json={}, headers=alice | key)
    bobs = await client.post("/api/conversations", json={}, headers=bob | key)
    assert (first.status_code, again.status_code, bobs.status_code) == (201, 200, 201)
    assert first.json()["conversation_id"] == again.json()["conversation_id"]
    assert bobs.json()["conversation_id"] != first.json()["conversation_id"]
    assert len(session_manager.commands) == 2  # the retry published nothing


async def test_post_times_out_with_a_problem_when_nothing_creates_it(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    session_manager.ignore_creates = True
    response = await client.post("/api/conversations", json={}, headers=alice)
    body = assert_problem(response, 504)
    assert body["conversation_id"]


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"initial_user_msg": ', 400),
        (b"[1, 2]", 422),
        (b'{"initial_user_msg": "x", "colour": "red"}', 422),
        (b'{"priority": 1000}', 422),
        (b'{"timeouts": {"idle_seconds": -1}}', 422),
    ],
)
async def test_invalid_create_bodies_publish_nothing(
    client: httpx.AsyncClient,
    alice: Headers,
    stream_sequences: StreamSequences,
    content: bytes,
    status: int,
) -> None:
    before = await stream_sequences()
    response = await client.post("/api/conversations", content=content, headers=alice)
    assert_problem(response, status)
    assert await stream_sequences() == before


async def test_unknown_routes_and_methods_are_problems(
    client: httpx.AsyncClient, alice: Headers
) -> None:
    assert_problem(await client.get("/api/nowhere", headers=alice), 404)
    assert_problem(await client.put("/api/conversations", headers=alice), 405)


async def test_other_users_unknown_and_malformed_ids_are_all_404(
    client: httpx.AsyncClient,
    alice: Headers,
    bob: Headers,
    session_manager: Any,
    event_store: Any,
    stream_sequences: StreamSequences,
) -> None:
    cid = await create(client, alice)
    before = await stream_sequences()
    for conversation_id in (cid, uuid.uuid4().hex, "not.a*valid id"):
        base = f"/api/conversations/{conversation_id}"
        assert_problem(await client.get(base, headers=bob), 404)
        assert_problem(await client.get(f"{base}/events", headers=bob), 404)
        assert_problem(await client.get(f"{base}/events/0", headers=bob), 404)
        assert_problem(await client.delete(base, headers=bob), 404)
        assert_problem(await client.post(f"{base}/stop", headers=bob), 404)
        message = await client.post(f"{base}/message", json={"message": "hi"}, headers=bob)
        assert_problem(message, 404)
    assert await stream_sequences() == before
    assert event_store.queries == []


async def test_commands_reach_session_manager(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    cid = await create(client, alice)
    base = f"/api/conversations/{cid}"
    message = await client.post(f"{base}/message", json={"message": "go on"}, headers=alice)
    assert (message.status_code, message.json()) == (202, {"status": "ok"})
    assert (await client.post(f"{base}/pause", headers=alice)).status_code == 202
    assert (await client.post(f"{base}/stop", json={}, headers=alice)).status_code == 202
    assert (await client.delete(base, headers=alice)).status_code == 202
    kinds = [type(command).__name__ for command in session_manager.commands]
    assert kinds == [
        "CreateConversation",
        "SendMessage",
        "PauseConversation",
        "StopConversation",
        "DeleteConversation",
    ]
    sent = session_manager.commands[1]
    assert isinstance(sent, SendMessage) and sent.content == "go on" and sent.user_id == "alice"
    assert isinstance(session_manager.commands[2], PauseConversation)
    assert isinstance(session_manager.commands[3], StopConversation)


async def test_a_retried_command_with_idempotency_key_is_published_once(
    client: httpx.AsyncClient,
    alice: Headers,
    session_manager: Any,
    stream_sequences: StreamSequences,
) -> None:
    cid = await create(client, alice)
    before, _ = await stream_sequences()
    key = {"Idempotency-Key": "pause-1"}
    for _ in range(2):
        response = await client.post(f"/api/conversations/{cid}/pause", headers=alice | key)
        assert response.status_code == 202
    after, _ = await stream_sequences()
    assert after == before + 1


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("message", b'{"message": "hi", "extra": 1}'),
        ("message", b'{"message": ""}'),
        ("message", b"{}"),
        ("pause", b'{"force": true}'),
    ],
)
async def test_invalid_command_bodies_publish_nothing(
    client: httpx.AsyncClient,
    alice: Headers,
    session_manager: Any,
    stream_sequences: StreamSequences,
    path: str,
    content: bytes,
) -> None:
    cid = await create(client, alice)
    before = await stream_sequences()
    response = await client.post(f"/api/conversations/{cid}/{path}", content=content, headers=alice)
    assert_problem(response, 422)
    assert await stream_sequences() == before


async def test_search_events_returns_the_wire_view(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any, event_store: Any
) -> None:
    cid = await create(client, alice, title="t")
    await session_manager.say(cid, "hello")
    response = await client.get(
        f"/api/conversations/{cid}/events",
        params={"start_id": 1, "limit": 5, "kind": ["MessageAction,ThinkAction", "LLMMetrics"]},
        headers=alice,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [e["id"] for e in body["events"]] == [1, 2]
    message = body["events"][1]
    assert (message["action"], message["message"], message["source"]) == (
        "message",
        "hello",
        "agent",
    )
    assert body["has_more"] is False
    (query,) = event_store.queries
    assert isinstance(query, SearchEvents)
    assert query.user_id == "alice" and query.start_id == 1 and query.limit == 5
    assert query.kinds == ["MessageAction", "ThinkAction", "LLMMetrics"]

    one = await client.get(f"/api/conversations/{cid}/events/2", headers=alice)
    assert one.json()["message"] == "hello"
    missing = await client.get(f"/api/conversations/{cid}/events/99", headers=alice)
    assert assert_problem(missing, 404)["detail"] == "no such event"


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 101}, {"start_id": -1}, {"source": "x"}]
)
async def test_invalid_event_queries_are_422_and_send_nothing(
    client: httpx.AsyncClient,
    alice: Headers,
    session_manager: Any,
    event_store: Any,
    params: dict[str, Any],
) -> None:
    cid = await create(client, alice)
    response = await client.get(f"/api/conversations/{cid}/events", params=params, headers=alice)
    assert_problem(response, 422)
    assert event_store.queries == []


@pytest.mark.parametrize("limit", [0, 101])
async def test_list_limit_out_of_range_is_422(
    client: httpx.AsyncClient, alice: Headers, event_store: Any, limit: int
) -> None:
    response = await client.get("/api/conversations", params={"limit": limit}, headers=alice)
    assert_problem(response, 422)
    assert event_store.queries == []


async def test_list_passes_filters_scoped_to_the_user(
    client: httpx.AsyncClient, bob: Headers, event_store: Any
) -> None:
    response = await client.get(
        "/api/conversations",
        params={"limit": 7, "status": "RUNNING", "title": "bug", "page_id": "p2"},
        headers=bob,
    )
    assert response.json() == {"results": [], "next_page_id": None}
    (query,) = event_store.queries
    assert (query.user_id, query.limit, query.status, query.title_contains, query.page_id) == (
        "bob",
        7,
        "RUNNING",
        "bug",
        "p2",
    )


async def test_event_store_not_answering_is_503(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    cid = await create(client, alice)
    assert_problem(await client.get(f"/api/conversations/{cid}/events", headers=alice), 503)
    assert_problem(await client.get("/api/conversations", headers=alice), 503)


async def test_openapi_documents_msgspec_bodies(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    create_op = schema["paths"]["/api/conversations"]["post"]
    ref = create_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ConversationSpec"
    assert "initial_user_msg" in schema["components"]["schemas"]["ConversationSpec"]["properties"]
