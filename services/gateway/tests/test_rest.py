"""The REST API against a real nats-server, with stand-ins for session-manager and event-store."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest
from fastapi import FastAPI
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from taskbus.contracts import subjects
from taskbus.contracts.commands import (
    ConfirmAction,
    CreateConversation,
    PauseConversation,
    SendMessage,
    StopConversation,
    UpdateSettings,
)
from taskbus.contracts.queries import (
    CostAnalytics,
    CostGroupBy,
    DurationAnalytics,
    EventKindCounts,
    FailingCommands,
    ListConversations,
    QueryError,
    SearchEvents,
)
from taskbus.contracts.runners import RunnerInfo, SandboxIsolation, encode_runner_info
from taskbus.contracts.secret_box import SecretBox, llm_key_context
from taskbus.contracts.specs import ConcurrencyPolicy, UserSettings
from taskbus.contracts.status import ConversationStatus
from taskbus.gateway.settings import GatewaySettings

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
    spec.setdefault("initial_user_msg", "hi")
    response = await client.post("/api/conversations", json=spec, headers=headers)
    assert response.status_code == 201, response.text
    cid: str = response.json()["conversation_id"]
    return cid


async def test_health_needs_no_key_and_names_each_runners_isolation(
    client: httpx.AsyncClient, js: JetStreamContext
) -> None:
    runners = await js.key_value(subjects.RUNNERS_BUCKET)
    with contextlib.suppress(NoKeysError):
        for key in await runners.keys():
            await runners.purge(key)
    response = await client.get("/api/health")
    assert response.json() == {
        "status": "ok",
        "nats": True,
        # No other service runs here: each is listed, not ready.
        "ready": False,
        "services": {
            service: {"ready": False, "instances": []}
            for service in ("session_manager", "runtime_runner", "event_store")
        },
        "runners": [],
        "warnings": ["no runtime-runner has registered: sandbox isolation unknown"],
    }
    started = datetime(2024, 5, 1, tzinfo=UTC)
    hardened = RunnerInfo(
        runner_id="r-docker", host="h1", backend="docker",
        isolation=SandboxIsolation.GVISOR, started_at=started,
    )  # fmt: skip
    unsandboxed = RunnerInfo(
        runner_id="r-local", host="h2", backend="local", isolation=SandboxIsolation.NONE,
        warning="bubblewrap is missing: apt-get install bubblewrap", started_at=started,
    )  # fmt: skip
    try:
        for info in (hardened, unsandboxed):
            await runners.put(info.runner_id, encode_runner_info(info))
        await runners.put("r-garbage", b"not json")
        body = (await client.get("/api/health")).json()
        assert body["status"] == "ok"
        assert [(r["runner_id"], r["backend"], r["isolation"]) for r in body["runners"]] == [
            ("r-docker", "docker", "gvisor"),
            ("r-local", "local", "none"),
        ]
        [warning] = body["warnings"]
        assert "r-local" in warning and "UNSANDBOXED" in warning
        assert "apt-get install bubblewrap" in warning
    finally:
        for key in ("r-docker", "r-local", "r-garbage"):
            await runners.purge(key)


async def test_a_405_names_every_method_of_the_path(
    client: httpx.AsyncClient, alice: Headers
) -> None:
    response = await client.request("PUT", "/api/conversations/abc", headers=alice)
    assert_problem(response, 405)
    assert response.headers["allow"] == "DELETE, GET, PATCH"


async def test_event_kinds_must_be_event_type_names(
    client: httpx.AsyncClient, alice: Headers
) -> None:
    for kind in ("false", "MessageAction,,X", "message_action"):
        response = await client.get(
            "/api/conversations/abc/events", params={"kind": kind}, headers=alice
        )
        assert_problem(response, 422)


async def test_openapi_declares_problem_answers(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    create = paths["/api/conversations"]["post"]["responses"]
    for status in ("400", "401", "413", "422", "429", "503"):
        assert "application/problem+json" in create[status]["content"], status
    assert "404" in paths["/api/conversations/{conversation_id}"]["get"]["responses"]


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
    # The answer shows the state at first visibility: session-manager may not have appended its
    # status change yet (the stand-in appends it right after ConversationCreated).
    assert body["conversation_status"] in {"QUEUED", "STARTING"}
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
    first = await client.post("/api/conversations", json={"title": "t"}, headers=alice | key)
    again = await client.post("/api/conversations", json={"title": "t"}, headers=alice | key)
    bobs = await client.post("/api/conversations", json={"title": "t"}, headers=bob | key)
    assert (first.status_code, again.status_code, bobs.status_code) == (201, 200, 201)
    assert first.json()["conversation_id"] == again.json()["conversation_id"]
    assert bobs.json()["conversation_id"] != first.json()["conversation_id"]
    assert len(session_manager.commands) == 2  # the retry published nothing


async def test_a_waiting_post_reads_the_log_once_however_long_session_manager_takes(
    app: FastAPI, client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    """The wait is woken by the ConversationCreated notification and confirms it with one read;
    it does not poll the log while session-manager is busy (three requests every 0.25 s did,
    most of the gateway's bus traffic under load)."""
    sent = app.state.bus.nc.stats

    async def requests_of_a_create(delay: float) -> int:
        session_manager.create_delay = delay
        before = sent["out_msgs"]
        response = await client.post("/api/conversations", json={"title": "t"}, headers=alice)
        assert response.status_code == 201, response.text
        assert response.json()["conversation"]["last_event_id"] == 0  # as first visible
        return int(sent["out_msgs"] - before)

    quick, slow = await requests_of_a_create(0.0), await requests_of_a_create(1.5)
    # Three reads up front, the publish, one read to confirm; one more should the notification
    # outrun JetStream's store of the event. (Polling made 16 and 31.)
    assert quick <= 6 and slow <= 6, (quick, slow)


async def test_a_refused_create_is_429_and_so_is_its_retry_which_publishes_nothing(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    session_manager.reject_creates = True
    session_manager.create_delay = 0.3  # the refusal must be waited for, not raced
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = await client.post("/api/conversations", json={"title": "t"}, headers=alice | key)
    body = assert_problem(first, 429)
    assert body["type"] == "urn:taskbus:problem:queue-full", body
    assert body["detail"] == "you already have 1 conversation waiting"
    again = await client.post("/api/conversations", json={"title": "t"}, headers=alice | key)
    assert assert_problem(again, 429)["conversation_id"] == body["conversation_id"]
    assert len(session_manager.commands) == 1


async def test_post_times_out_with_a_problem_when_nothing_creates_it(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    session_manager.ignore_creates = True
    response = await client.post("/api/conversations", json={"title": "t"}, headers=alice)
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
        (b'{"repository": "https://ghp_secret@github.com/acme/web.git"}', 422),
        (b'{"repository": "https://user:secret@example.org/acme/web.git"}', 422),
        (b'{"repository": "ssh://git:secret@example.org/acme/web.git"}', 422),
        # A suggested task's provider becomes the conversation's: one the clone knows, or 422
        # (schemathesis once sent one that went through and was refused by session-manager).
        (
            b'{"suggested_task": {"git_provider": "\\u00e4\\u001f", "task_type": "OPEN_PR",'
            b' "repo": "", "issue_number": 1, "title": "t"}}',
            422,
        ),
        (b'{"create_microagent": {"repo": "a/b", "git_provider": "nowhere"}}', 422),
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
        assert_problem(await client.post(f"{base}/confirm", headers=bob), 404)
        message = await client.post(f"{base}/message", json={"message": "hi"}, headers=bob)
        assert_problem(message, 404)
        renamed = await client.patch(base, json={"title": "mine now"}, headers=bob)
        assert_problem(renamed, 404)
        added = {"action": "message", "args": {"content": "hi"}, "source": "user"}
        assert_problem(await client.post(f"{base}/events", json=added, headers=bob), 404)
        assert_problem(await client.get(f"{base}/trajectory", headers=bob), 404)
        assert_problem(await client.get(f"{base}/config", headers=bob), 404)
    assert await stream_sequences() == before
    assert event_store.queries == []


async def test_an_owners_later_commands_publish_at_once_and_others_stay_404(
    client: httpx.AsyncClient,
    alice: Headers,
    bob: Headers,
    session_manager: Any,
    js: JetStreamContext,
    stream_sequences: StreamSequences,
) -> None:
    """An owner never changes: once a command found the conversation the user's, the next ones
    read nothing before they publish (a message is the hot path). Another user is still
    refused with nothing published; a keyless command's id is fresh, a keyed one's is not."""
    cid = await create(client, alice)
    base = f"/api/conversations/{cid}"
    first = await client.post(f"{base}/message", json={"message": "one"}, headers=alice)
    assert first.status_code == 202, first.text
    before = await stream_sequences()
    assert_problem(await client.post(f"{base}/message", json={"message": "x"}, headers=bob), 404)
    assert_problem(await client.post(f"{base}/stop", headers=bob), 404)
    assert await stream_sequences() == before
    # Take the conversation out of the log: a read before the publish would now answer 404.
    await js.purge_stream(subjects.EVENTS_STREAM, subject=subjects.conversation_events(cid))
    keyed = {**alice, "Idempotency-Key": f"two-{cid}"}
    second = await client.post(f"{base}/message", json={"message": "two"}, headers=keyed)
    assert second.status_code == 202, second.text
    sent = [c for c in session_manager.commands if isinstance(c, SendMessage)]
    assert [(c.content, c.fresh_id) for c in sent[-2:]] == [("one", True), ("two", False)]
    assert_problem(await client.post(f"{base}/message", json={"message": "x"}, headers=bob), 404)


async def test_a_client_cannot_choose_its_commands_id_or_claim_it_fresh(
    client: httpx.AsyncClient,
    alice: Headers,
    session_manager: Any,
    stream_sequences: StreamSequences,
) -> None:
    """The attack on the verdict shortcut: a body naming another command's id, or claiming a
    fresh one (no earlier verdict looked up), is refused and publishes nothing; the ids and
    the claim stay the gateway's to make."""
    cid = await create(client, alice)
    base = f"/api/conversations/{cid}/message"
    before = await stream_sequences()
    for forged in ({"fresh_id": True}, {"command_id": "a" * 32}, {"fresh_id": False}):
        answer = await client.post(base, json={"message": "x", **forged}, headers=alice)
        assert_problem(answer, 422)
    assert await stream_sequences() == before
    keyed = {**alice, "Idempotency-Key": "mine"}
    assert (await client.post(base, json={"message": "y"}, headers=keyed)).status_code == 202
    (sent,) = [c for c in session_manager.commands if isinstance(c, SendMessage)][-1:]
    assert sent.fresh_id is False and sent.command_id is not None


async def test_a_slow_verdict_is_waited_for_without_reading_the_bucket(
    app: FastAPI, client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    """The put's notification wakes the wait: no read of the verdicts bucket every 0.25 s while
    session-manager is slow (four more requests here), load added exactly when loaded."""
    cid = await create(client, alice)
    message = f"/api/conversations/{cid}/message"
    assert (await client.post(message, json={"message": "a"}, headers=alice)).status_code == 202
    session_manager.verdict_delay = 1.0
    sent = app.state.bus.nc.stats
    before = sent["out_msgs"]
    response = await client.post(message, json={"message": "b"}, headers=alice)
    assert response.status_code == 202, response.text
    assert sent["out_msgs"] - before == 1  # the command alone: its owner is known by now


async def test_commands_reach_session_manager(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    cid = await create(client, alice)
    base = f"/api/conversations/{cid}"
    message = await client.post(f"{base}/message", json={"message": "go on"}, headers=alice)
    assert (message.status_code, message.json()["status"]) == (202, "ok")
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
    assert_problem(await client.get("/api/analytics/cost", headers=alice), 503)


async def test_openapi_documents_msgspec_bodies(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    create_op = schema["paths"]["/api/conversations"]["post"]
    ref = create_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ConversationSpec"
    assert "initial_user_msg" in schema["components"]["schemas"]["ConversationSpec"]["properties"]


async def test_confirm_and_reject_answer_the_pending_action(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any
) -> None:
    cid = await create(client, alice)
    base = f"/api/conversations/{cid}"
    for action in ("confirm", "reject"):
        response = await client.post(f"{base}/{action}", headers=alice)
        assert (response.status_code, response.json()["status"]) == (202, "ok")
    assert_problem(await client.post(f"{base}/confirm", json={"why": 1}, headers=alice), 422)
    confirm, reject = session_manager.commands[1:]
    assert isinstance(confirm, ConfirmAction) and isinstance(reject, ConfirmAction)
    assert (confirm.user_id, confirm.conversation_id, confirm.confirmed) == ("alice", cid, True)
    assert (reject.user_id, reject.conversation_id, reject.confirmed) == ("alice", cid, False)


@pytest.mark.parametrize(
    ("params", "status", "excluded"),
    [
        ({}, None, [ConversationStatus.ARCHIVED]),
        ({"status": "RUNNING"}, ConversationStatus.RUNNING, [ConversationStatus.ARCHIVED]),
        # Deleted means gone: not even asking for ARCHIVED lists a deleted conversation.
        ({"status": "ARCHIVED"}, ConversationStatus.ARCHIVED, [ConversationStatus.ARCHIVED]),
    ],
)
async def test_list_never_shows_deleted_conversations(
    client: httpx.AsyncClient,
    alice: Headers,
    event_store: Any,
    params: dict[str, str],
    status: ConversationStatus | None,
    excluded: list[ConversationStatus],
) -> None:
    assert (await client.get("/api/conversations", params=params, headers=alice)).is_success
    (query,) = event_store.queries
    assert isinstance(query, ListConversations)
    assert (query.status, query.exclude_statuses) == (status, excluded)


# --- analytics --------------------------------------------------------------------------------

MAY, JUNE = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)
WINDOW = {"since": "2024-05-01T00:00:00Z", "until": "2024-06-01T00:00:00Z"}


@pytest.mark.parametrize(
    ("path", "params", "expected"),
    [
        ("cost", {}, CostAnalytics(user_id="bob")),
        (
            "cost",
            {"group_by": "conversation", **WINDOW},
            CostAnalytics(user_id="bob", group_by=CostGroupBy.CONVERSATION, since=MAY, until=JUNE),
        ),
        ("durations", {"since": WINDOW["since"]}, DurationAnalytics(user_id="bob", since=MAY)),
        (
            "event-kinds",
            {"conversation_id": "c1", "until": WINDOW["until"]},
            EventKindCounts(user_id="bob", conversation_id="c1", until=JUNE),
        ),
        ("failing-commands", {}, FailingCommands(user_id="bob")),
        (
            "failing-commands",
            {"limit": 2, **WINDOW},
            FailingCommands(user_id="bob", limit=2, since=MAY, until=JUNE),
        ),
    ],
)
async def test_analytics_ask_event_store_for_the_callers_report(
    client: httpx.AsyncClient,
    bob: Headers,
    event_store: Any,
    path: str,
    params: dict[str, Any],
    expected: Any,
) -> None:
    response = await client.get(f"/api/analytics/{path}", params=params, headers=bob)
    assert response.status_code == 200, response.text
    assert "type" not in response.json()
    assert event_store.queries == [expected]


async def test_analytics_answer_the_report_as_json(
    client: httpx.AsyncClient, alice: Headers, event_store: Any
) -> None:
    cost = await client.get("/api/analytics/cost", params={"group_by": "model"}, headers=alice)
    assert cost.json() == {
        "group_by": "model",
        "buckets": [
            {
                "key": "gpt-4o",
                "cost": 1.25,
                "llm_calls": 3,
                "prompt_tokens": 1000,
                "completion_tokens": 200,
                "conversations": 2,
            }
        ],
    }
    durations = (await client.get("/api/analytics/durations", headers=alice)).json()
    assert [outcome["status"] for outcome in durations["outcomes"]] == ["FINISHED", "RUNNING"]
    assert durations["outcomes"][0]["p90_seconds"] == 38.0
    assert durations["outcomes"][1]["mean_seconds"] is None
    kinds = (await client.get("/api/analytics/event-kinds", headers=alice)).json()
    assert kinds == {"kinds": [{"kind": "MessageAction", "events": 4, "conversations": 2}]}
    failing = await client.get(
        "/api/analytics/failing-commands", params={"limit": 2}, headers=alice
    )
    commands = failing.json()["commands"]
    assert [c["command"] for c in commands] == ["pytest -k case0", "pytest -k case1"]
    assert commands[0]["last_failed_at"] == "2024-05-01T12:00:00Z"


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("cost", {"group_by": "week"}),
        ("cost", {"since": "yesterday"}),
        ("durations", {"until": "not-a-time"}),
        ("event-kinds", {"since": "2024-13-01T00:00:00Z"}),
        ("failing-commands", {"limit": 0}),
        ("failing-commands", {"limit": 101}),
    ],
)
async def test_invalid_analytics_parameters_are_422_and_send_nothing(
    client: httpx.AsyncClient,
    alice: Headers,
    event_store: Any,
    path: str,
    params: dict[str, Any],
) -> None:
    response = await client.get(f"/api/analytics/{path}", params=params, headers=alice)
    assert_problem(response, 422)
    assert event_store.queries == []


async def test_analytics_need_a_key_and_relay_query_errors(
    client: httpx.AsyncClient, alice: Headers, event_store: Any
) -> None:
    assert_problem(await client.get("/api/analytics/durations"), 401)
    assert event_store.queries == []
    event_store.analytics_error = QueryError(
        status=422, title="Invalid query", detail="until is before since"
    )
    body = assert_problem(await client.get("/api/analytics/durations", headers=alice), 422)
    assert (body["title"], body["detail"]) == ("Invalid query", "until is before since")
    assert body["type"] == "urn:taskbus:problem:query-error"


# --- settings ---------------------------------------------------------------------------------

SECRET = "sk-test-0123456789-very-secret"
NULL_SETTINGS = {
    "llm_model": None,
    "llm_api_key_set": False,
    "llm_base_url": None,
    "max_budget_per_task": None,
    "max_iterations": None,
    "max_concurrent_conversations": None,
    "no_change_timeout_seconds": None,
    "confirmation_mode": False,
    "concurrency_policy": None,
    "mcp_config": None,
    # OpenHands' ApiSettings keys Taskbus has no setting for, at their documented values.
    "agent": "CodeActAgent",
    "language": "en",
    "llm_api_key": None,
    "search_api_key_set": False,
    "security_analyzer": None,
    "remote_runtime_resource_factor": None,
    "enable_default_condenser": True,
    "condenser_max_size": None,
    "enable_sound_notifications": False,
    "enable_proactive_conversation_starters": False,
    "enable_solvability_analysis": False,
    "user_consents_to_analytics": None,
    "provider_tokens_set": {},
}


async def stored_settings(kv: KeyValue, user: str) -> UserSettings:
    entry = await kv.get(user)
    return msgspec.json.decode(entry.value or b"", type=UserSettings)


async def test_settings_default_to_nulls(
    client: httpx.AsyncClient, alice: Headers, settings_kv: KeyValue
) -> None:
    response = await client.get("/api/settings", headers=alice)
    assert (response.status_code, response.json()) == (200, NULL_SETTINGS)
    assert_problem(await client.get("/api/settings"), 401)


async def test_put_settings_stores_them_and_never_shows_the_key(
    client: httpx.AsyncClient,
    settings: GatewaySettings,
    alice: Headers,
    bob: Headers,
    session_manager: Any,
    settings_kv: KeyValue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # litellm, once imported by another suite in this process, turns httpx's logger down.
    caplog.set_level(logging.DEBUG, logger="httpx")
    session_manager.settings_delay = 0.2  # the answer must wait for the write, not race it
    full = {
        "llm_model": "anthropic/claude-sonnet-4",
        "llm_api_key": SECRET,
        "max_iterations": 50,
        "concurrency_policy": "queue",
    }
    put = await client.put("/api/settings", json=full, headers=alice)
    assert put.status_code == 200, put.text
    expected = NULL_SETTINGS | full | {"llm_api_key_set": True, "llm_api_key": None}
    assert put.json() == expected
    assert (await client.get("/api/settings", headers=alice)).json() == expected
    assert (await client.get("/api/settings", headers=bob)).json() == NULL_SETTINGS
    (command,) = session_manager.commands
    # The key leaves the gateway sealed for alice; only the secrets key opens it.
    sealed = command.settings.llm_api_key
    assert sealed is not None and SECRET not in sealed
    box = SecretBox(settings.secrets_key or "")
    assert box.open(sealed, llm_key_context("alice")) == SECRET
    assert command == UpdateSettings(
        user_id="alice",
        settings=UserSettings(
            llm_model="anthropic/claude-sonnet-4",
            llm_api_key=sealed,
            max_iterations=50,
            concurrency_policy=ConcurrencyPolicy.QUEUE,
        ),
    )

    # A PUT replaces everything but a key it does not mention.
    put = await client.put("/api/settings", json={"max_budget_per_task": 3}, headers=alice)
    assert put.json() == NULL_SETTINGS | {"max_budget_per_task": 3.0, "llm_api_key_set": True}
    assert await stored_settings(settings_kv, "alice") == UserSettings(
        llm_api_key=sealed, max_budget_per_task=3
    )
    # An empty key clears it.
    put = await client.put("/api/settings", json={"llm_api_key": ""}, headers=alice)
    assert put.json() == NULL_SETTINGS

    responses = [put.text, (await client.get("/api/settings", headers=alice)).text]
    assert all(SECRET not in text for text in responses)
    assert caplog.records, "the gateway logs nothing at DEBUG?"
    assert all(SECRET not in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"llm_model": ', 400),
        (b'{"colour": "red"}', 422),
        (b'{"llm_api_key_set": true}', 422),
        (f'{{"llm_api_key": "{SECRET}", "max_budget_per_task": 0.5}}'.encode(), 422),
        (b'{"max_iterations": 0}', 422),
        (b'{"concurrency_policy": "lifo"}', 422),
    ],
)
async def test_invalid_settings_are_rejected_and_send_nothing(
    client: httpx.AsyncClient,
    alice: Headers,
    stream_sequences: StreamSequences,
    content: bytes,
    status: int,
) -> None:
    before = await stream_sequences()
    response = await client.put("/api/settings", content=content, headers=alice)
    assert_problem(response, status)
    assert SECRET not in response.text
    assert await stream_sequences() == before


async def test_put_settings_is_504_when_nothing_stores_them(
    client: httpx.AsyncClient, alice: Headers, session_manager: Any, settings_kv: KeyValue
) -> None:
    session_manager.ignore_settings = True
    response = await client.put("/api/settings", json={"max_iterations": 7}, headers=alice)
    assert assert_problem(response, 504)["type"] == "urn:taskbus:problem:not-visible-yet"
    assert len(session_manager.commands) == 1
